"""mkdocs hook: links to files outside docs/ work on the site as they do on GitHub.

The manual links the generated results, the lab notes and source files by paths relative to the page
(``../experiments/results/foundation.md``, ``../../g2rpo/algos/g2rpo.py``), so that it reads on GitHub. mkdocs
only knows docs/ and would report every such link as missing. This hook
- publishes ``experiments/results/*.md`` and ``*.png`` and ``experiments/notes/*.md`` under the same paths, so
  results live in one copy and the site shows it (their README index is for GitHub; docs/results.md is the
  site's);
- rewrites links to them relative to the page, and links to any other file of the repository into a
  ``repo_url`` blob link;
- leaves a link to a file that does not exist as it is, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ("experiments/results/*.md", "experiments/results/*.png", "experiments/notes/*.md")
LINK_TARGET = re.compile(r"(\]\()([^)\s]+)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)

published: set[str] = set()


def on_files(files, config):
    published.clear()
    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            if path.name != "README.md":
                uri = path.relative_to(ROOT).as_posix()
                published.add(uri)
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Rewrite the link targets of ``page`` outside its fenced code blocks."""
    here = page.file.src_uri
    in_repo = here if here in published else f"docs/{here}"

    def rewrite(match: re.Match) -> str:
        target = match[2]
        path, hash_, anchor = target.partition("#")
        if not path or ":" in path or path.startswith("/"):
            return match[0]  # an anchor on this page, a URL, or an absolute path: mkdocs checks those
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(in_repo), path))
        if repo_path.startswith("docs/"):
            site_path = repo_path.removeprefix("docs/")
        elif repo_path in published:
            site_path = repo_path
        elif not repo_path.startswith("../") and (ROOT / repo_path).exists():
            kind = "tree" if (ROOT / repo_path).is_dir() else "blob"
            return f"{match[1]}{config.repo_url.rstrip('/')}/{kind}/main/{repo_path}{hash_}{anchor}"
        else:
            return match[0]  # no such file: mkdocs reports the link, and --strict fails
        return match[1] + posixpath.relpath(site_path, posixpath.dirname(here) or ".") + hash_ + anchor

    pieces, last = [], 0
    for fence in FENCE.finditer(markdown):
        pieces += [LINK_TARGET.sub(rewrite, markdown[last : fence.start()]), fence[0]]
        last = fence.end()
    pieces.append(LINK_TARGET.sub(rewrite, markdown[last:]))
    return "".join(pieces)

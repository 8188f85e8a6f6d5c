"""Two editing benchmarks as evaluation prompt sets, read from local copies of their official files (nothing
is downloaded at run time): each case's instruction is the prompt, its source image a file named in the
metadata (``source_image``, as every edit carries it), and its edit type the task (``tag``).

**GEdit-Bench** (``stepfun-ai/GEdit-Bench`` on the Hugging Face Hub; Step1X-Edit, arXiv 2504.17761): 606
real-world edit requests in 11 types, each with an English and a Chinese instruction (1,212 rows, the split
``train`` that ``load_dataset`` reads). ``hf download stepfun-ai/GEdit-Bench --repo-type dataset --local-dir
<dir>`` fetches its Arrow files; any ``*.arrow`` (either Arrow IPC format) or ``*.parquet`` file under
``<dir>`` is read. A row holds ``key``, ``task_type``, ``instruction``, ``instruction_language`` (``en`` or
``cn``), the source encoded twice (``input_image``, ``input_image_raw``) and ``Intersection_exist``, the flag
of the paper's intersection subset. The model gets ``input_image_raw``, as the official
``generate_image_example.py`` does; its bytes are written once, unchanged, to
``<source_dir>/<task_type>/<language>/<key>.<format>`` and read from there on later passes.

**ImgEdit-Bench**, its basic suite (``sysuyy/ImgEdit`` on the Hub, ``Benchmark.tar``; arXiv 2505.20275):
``Benchmark/singleturn/singleturn.json`` maps each of 737 keys to ``{"id": "<folder>/<file>.jpg", "prompt",
"edit_type"}`` in 9 types (the GitHub repository's ``Benchmark/Basic/basic_edit.json`` has the same form),
and each source image lies at its ``id`` under the JSON's folder.

Cases are ordered by edit type as the papers' tables list them (file order within a type), so the tables'
rows come out in that order. A malformed row fails naming its file and its row or key.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from g2rpo.data import PromptDataset
from g2rpo.files import atomic_write

GEDIT_TASKS = (
    "background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
    "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer",
)  # fmt: skip
GEDIT_COLUMNS = (
    "key",
    "task_type",
    "instruction",
    "instruction_language",
    "input_image_raw",
    "Intersection_exist",
)
GEDIT_SOURCE = "input_image_raw"
#: ImgEdit-Bench's basic suite in its paper's column order ("compose" is the paper's "hybrid")
IMGEDIT_TASKS = ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")


def _record_batches(file: Path) -> Iterator:
    """The record batches of an Arrow file (stream format, as ``save_to_disk`` writes; or file format) or of a
    Parquet file, memory-mapped: images are copied out only for the cases kept."""
    import pyarrow as pa

    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(file).iter_batches(batch_size=64)
        return
    with pa.memory_map(str(file)) as stream:
        try:
            batches = iter(pa.ipc.open_stream(stream))
        except pa.ArrowInvalid:
            stream.seek(0)
            reader = pa.ipc.open_file(stream)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from batches


def _gedit_files(root: Path, download: str) -> list[Path]:
    files = (
        sorted(p for p in root.rglob("*.arrow") if not p.name.startswith("cache-")) if root.is_dir() else []
    )
    files = files or (sorted(root.rglob("*.parquet")) if root.is_dir() else [])
    if not files:
        raise FileNotFoundError(
            f"eval.dataset.path: no prompt file at {root} (GEdit-Bench's *.arrow or *.parquet files, searched "
            f"in every folder below it). Get it with:\n  {download}"
        )
    return files


def _ordered(prompts: list[str], metadata: list[dict], tasks: tuple[str, ...]) -> PromptDataset:
    order = sorted(range(len(prompts)), key=lambda i: tasks.index(metadata[i]["tag"]))
    return PromptDataset(prompts=[prompts[i] for i in order], metadata=[metadata[i] for i in order])


def _write_source(folder: Path, key: str, cell: dict | None, where: str) -> Path:
    """The source image's file, written from its encoded cell unless an earlier pass wrote it."""
    written = sorted(folder.glob(f"{glob.escape(key)}.*"))
    if written:
        return written[0]
    data = (cell or {}).get("bytes")
    if data is None and (cell or {}).get("path") and Path(cell["path"]).is_file():
        data = Path(cell["path"]).read_bytes()
    if not data:
        raise ValueError(f"{where}: {GEDIT_SOURCE} holds no image bytes ({cell!r:.80})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = (image.format or "png").lower()
    except OSError as error:
        raise ValueError(f"{where}: {GEDIT_SOURCE} is not an image ({error})") from None
    file = folder / f"{key}.{suffix}"
    atomic_write(file, lambda stream: stream.write(data))
    return file


def gedit_bench(
    path: str,
    source_dir: str,
    download: str,
    language: str = "en",
    intersection_only: bool = False,
    limit: int | None = None,
) -> PromptDataset:
    """GEdit-Bench's cases in ``language`` (``en``: GEdit-Bench-EN), all or the intersection subset's, at most
    ``limit`` per type (file order); ``download`` says how to get the files."""
    root = Path(path)
    prompts, metadata, seen, kept = [], [], set(), dict.fromkeys(GEDIT_TASKS, 0)
    languages = set()
    for file in _gedit_files(root, download):
        row = -1
        for batch in _record_batches(file):
            missing = [c for c in GEDIT_COLUMNS if c not in batch.schema.names]
            if missing:
                raise ValueError(
                    f"{file}: no column(s) {', '.join(missing)} (found {', '.join(batch.schema.names)}); these "
                    "are not GEdit-Bench's files (stepfun-ai/GEdit-Bench)"
                )
            fields = batch.select([c for c in GEDIT_COLUMNS if c != GEDIT_SOURCE]).to_pylist()
            for index, case in enumerate(fields):
                row += 1
                key, task, text, lang = (case[c] for c in GEDIT_COLUMNS[:4])
                where = f"{file}: row {row} (key {key!r})"
                if not isinstance(key, str) or not key.strip() or "/" in key:
                    raise ValueError(f"{where}: the key must be a non-empty name without '/'")
                if task not in GEDIT_TASKS:
                    raise ValueError(f"{where}: task_type {task!r} is not one of GEdit-Bench's {GEDIT_TASKS}")
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{where}: the instruction must be a non-empty string, got {text!r}")
                if not isinstance(lang, str) or not lang.strip() or "/" in lang:
                    raise ValueError(f"{where}: instruction_language must be a language code, got {lang!r}")
                languages.add(lang)
                if (task, lang, key) in seen:
                    raise ValueError(f"{where}: a second {task} case in {lang!r} with this key")
                seen.add((task, lang, key))
                wanted = lang == language and (case["Intersection_exist"] or not intersection_only)
                if not wanted or (limit is not None and kept[task] >= limit):
                    continue
                kept[task] += 1
                cell = batch.column(GEDIT_SOURCE)[index].as_py()
                image = _write_source(Path(source_dir) / task / lang, key, cell, where)
                prompts.append(text.strip())
                metadata.append(
                    {
                        "tag": task,
                        "key": key,
                        "language": lang,
                        "intersection": bool(case["Intersection_exist"]),
                        "source_image": str(image),
                    }
                )
    if not prompts:
        raise ValueError(
            f"{root}: no GEdit-Bench case in language {language!r}"
            + (" in the intersection subset" if intersection_only else "")
            + f" (the files hold {sorted(languages)})"
        )
    return _ordered(prompts, metadata, GEDIT_TASKS)


def imgedit_bench(
    path: str, download: str, image_root: str | None = None, limit: int | None = None
) -> PromptDataset:
    """ImgEdit-Bench's basic suite from ``singleturn.json`` (or ``basic_edit.json``), its images under
    ``image_root`` (default: the JSON's folder), at most ``limit`` cases per type (file order); ``download``
    says how to get the files. Every source image is checked here, before any model loads."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"eval.dataset.path: no prompt file at {file} (ImgEdit-Bench's singleturn.json). Get it with:\n  "
            f"{download}"
        )
    root = Path(image_root) if image_root else file.parent
    try:
        cases = json.loads(file.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not a JSON file ({error}); fix or download it again") from None
    if not isinstance(cases, dict):
        raise ValueError(f'{file}: must be a JSON object of key -> {{"id", "prompt", "edit_type"}}')
    prompts, metadata, kept = [], [], dict.fromkeys(IMGEDIT_TASKS, 0)
    for key, case in cases.items():
        where = f"{file}: key {key!r}"
        missing = sorted({"id", "prompt", "edit_type"} - set(case)) if isinstance(case, dict) else ["id"]
        if missing:
            raise ValueError(
                f'{where}: a case is {{"id", "prompt", "edit_type"}}; it has no {missing}: {case!r:.120}'
            )
        kind, prompt = case["edit_type"], case["prompt"]
        if kind not in IMGEDIT_TASKS:
            raise ValueError(f"{where}: edit_type {kind!r} is not one of ImgEdit-Bench's {IMGEDIT_TASKS}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: the prompt must be a non-empty string, got {prompt!r}")
        image = root / str(case["id"])
        if not image.is_file():
            raise FileNotFoundError(f"{where}: no source image at {image} (its id under {root})")
        if limit is not None and kept[kind] >= limit:
            continue
        kept[kind] += 1
        prompts.append(prompt.strip())
        metadata.append({"tag": kind, "edit_type": kind, "key": key, "source_image": str(image)})
    if not prompts:
        raise ValueError(f"{file}: no cases")
    return _ordered(prompts, metadata, IMGEDIT_TASKS)

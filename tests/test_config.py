"""Every config option composes and builds; bad input fails naming the valid options or the bad field."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments.reproduce import SUITES, Suite
from g2rpo.config import run_name

GROUPS = [
    "algo", "model", "reward", "data", "eval", "curriculum", "trainer", "logger", "callbacks", "schedule",
]  # fmt: skip
NEEDS_DOWNLOADED_WEIGHTS = {
    "sd3", "sd35_medium", "flux_dev", "flux_kontext", "pickscore", "clipscore", "aesthetic", "hps", "hps_clip", "imagereward",
    "janus_pro_1b", "janus_pro_7b", "qwen_image", "qwen_image_edit", "qwen25_vl_3b_judge", "qwen25_vl_7b_judge",
    "qwen25_math_1_5b", "qwen25_math_7b",
}  # fmt: skip
# prompt files of the papers' data sets, not shipped (README, "Rewards": prompt data)
NEEDS_DOWNLOADED_DATA = {"prompt_file", "pair_file", "preference_pairs", "math_jsonl"}
# evaluation suites on the papers' prompt sets (conf/eval/*.yaml say where to get each)
EVAL_NEEDS_DOWNLOADED_DATA = {
    "geneval", "drawbench", "drawbench_served", "ocr", "pairuni", "gedit_bench", "imgedit_bench", "math_reasoning",
}  # fmt: skip
# ddp and fsdp default to GPUs; tests run them on CPU (test_distributed.py)
NEEDS_A_GPU = {"gpu", "ddp", "fsdp"}
# the GPU benchmark's 2.2B-parameter random model: built on the meta device here, no weights allocated
BENCHMARK_ONLY = {"sd35_medium_random"}


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(compose_config, group, option):
    cfg = compose_config(f"{group}={option}")
    node = cfg[group]
    if group == "model" and option in BENCHMARK_ONLY:
        with torch.device("meta"):
            policy = instantiate(node)
        assert 2.2e9 < sum(p.numel() for p in policy.transformer.parameters()) < 2.3e9
    elif group in ("model", "reward") and option in NEEDS_DOWNLOADED_WEIGHTS:
        with pytest.raises(Exception, match="hf download"):
            instantiate(node)
    elif group == "data" and option in NEEDS_DOWNLOADED_DATA:
        with pytest.raises(Exception, match="G2RPO_DATA"):  # hydra wraps the FileNotFoundError
            instantiate(node)
    elif group == "eval" and option in EVAL_NEEDS_DOWNLOADED_DATA:
        with pytest.raises(Exception, match="no prompt file at .* Get it with"):  # before any model loads
            instantiate(node)
    elif group == "trainer" and option in NEEDS_A_GPU and not torch.cuda.is_available():
        with pytest.raises(Exception, match="gpu"):
            instantiate(node, logger=False)
    elif group == "trainer":
        assert instantiate(node, logger=False) is not None
    elif group in ("logger", "callbacks"):
        assert all(instantiate(child) is not None for child in node.values())
    else:
        assert instantiate(node, _convert_="object") is not None


def experiments():
    """Every preset (``conf/experiment/**/*.yaml``, suite bases included) and every suite row (its overrides,
    then its suite's, as ``experiments.reproduce`` runs it)."""
    presets = sorted((CONF_DIR / "experiment").rglob("*.yaml"))
    names = [p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix() for p in presets]
    suites = [Suite.load(path) for path in sorted(SUITES.glob("*.yaml"))]
    rows = [[*row["overrides"], *suite.overrides] for suite in suites for row in suite.rows]
    return [[f"experiment={name}"] for name in names] + list(map(list, dict.fromkeys(map(tuple, rows))))


def test_experiment_configs_compose_and_their_data_builds(compose_config):
    """Every preset and suite row composes, and its data config builds, or fails only on a missing prompt file
    (a key left over from the default data group would fail here, not minutes into a GPU job)."""
    for overrides in experiments():
        cfg = compose_config(*overrides)
        assert cfg.algo is not None
        try:
            assert len(instantiate(cfg.data)) > 0
        except Exception as error:  # hydra wraps the FileNotFoundError; any other error fails
            paper = overrides[0].startswith("experiment=paper_")
            assert paper and "FileNotFoundError" in str(error), (overrides, error)


def test_unknown_field_and_wrong_type_name_the_key(compose_config):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("algo.clip_rnage=1e-3")
    assert "clip_rnage" in str(error.value.__cause__)
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("algo.clip_range=wide")
    assert "algo.clip_range" in str(error.value.__cause__)
    with pytest.raises(ConfigCompositionException) as error:
        compose_config("curriculum.group_size=2.5")
    assert "curriculum.group_size" in str(error.value.__cause__)


def test_cross_field_errors_are_raised_when_building(compose_config):
    with pytest.raises(Exception, match="never the last step"):
        instantiate(compose_config("algo.timestep_fraction=1.0").algo, _convert_="object")


@pytest.mark.parametrize(
    ("algo", "minimum"), [("flow_grpo", 2), ("dance_grpo", 2), ("mix_grpo", 3), ("g2rpo", 2), ("dgpo", 1)]
)
def test_too_few_rollout_steps_blame_num_steps_first(compose_config, algo, minimum):
    """``algo.num_steps=0`` names itself and its minimum, not a field it makes impossible (timestep_fraction)."""
    for steps in (0, minimum - 1):
        with pytest.raises(
            Exception, match=rf"algo.num_steps={steps} is too few .* the minimum is {minimum}"
        ):
            instantiate(compose_config(f"algo={algo}", f"algo.num_steps={steps}").algo, _convert_="object")


def test_run_directory_is_named_by_the_overrides():
    assert run_name("") == "default"
    assert run_name("algo=flow_grpo,seed=1") == "algo=flow_grpo,seed=1"
    assert run_name("model.pipeline.path=/data/sd3") == "model.pipeline.path=_data_sd3"


def test_a_long_override_list_names_a_directory_that_fits_a_file_name():
    """Linux allows 255 bytes in a file name: past 200, a readable start, cut between characters, and a hash of
    the whole name, so the same command resumes and a different one does not."""
    overrides = ",".join(f"algo.option_{i}=value_{i}" for i in range(40))
    name = run_name(overrides)
    assert len(name.encode()) <= 200 and name.startswith("algo.option_0=value_0,algo.option_1=")
    assert run_name(overrides) == name and run_name(overrides + "1") != name
    wide = run_name("é" * 150)  # 2 bytes a character: the cut at 183 bytes falls inside one
    assert wide.startswith("é" * 91 + "-") and len(wide.encode()) == 91 * 2 + 1 + 16


def test_a_long_command_line_composes_a_run_directory_that_can_be_made(tmp_path):
    overrides = [f"+note_{i}='a note, with spaces, ümlauts: {i}'" for i in range(20)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        names = [
            compose("config", overrides=[*overrides, f"seed={seed}"], return_hydra_config=True)
            for seed in (3, 4)
        ]
    dirs, hydra = [], HydraConfig.instance()
    previous = hydra.cfg
    try:
        for cfg in names:
            hydra.set_config(cfg)  # what ${hydra:job.override_dirname} reads, as in a real run
            assert len(cfg.hydra.job.override_dirname.encode()) > 255  # the name Hydra would have used before
            dirs.append(Path(cfg.hydra.run.dir))
    finally:
        hydra.cfg = previous
    assert dirs[0].parent == Path("outputs") and dirs[0] != dirs[1]  # seed sorts last: only the hash differs
    for run_dir in dirs:
        assert len(run_dir.name.encode()) <= 200
        (tmp_path / run_dir.name).mkdir()  # "File name too long" before


def test_cli_unknown_option_lists_the_valid_ones(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "g2rpo.run", "algo=does_not_exist"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Could not find 'algo/does_not_exist'" in result.stderr
    assert "Available options in 'algo':" in result.stderr and "flow_grpo" in result.stderr
    assert not Path(tmp_path, "outputs").exists()


def test_yaml_defaults_match_the_dataclass_defaults(compose_config):
    """The algorithm dataclass is the schema: composing algo=flow_grpo reproduces its defaults."""
    from g2rpo.algos import FlowGRPO

    composed = instantiate(compose_config().algo, _convert_="object")
    assert OmegaConf.structured(composed) == OmegaConf.structured(FlowGRPO())

"""``python -m g2rpo.plan [overrides]``: what a run costs and whether it fits, before any GPU is used."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import g2rpo.config  # noqa: F401  (schemas and resolvers, as g2rpo.run)
from g2rpo.plan.gpus import gpu
from g2rpo.plan.levers import with_levers
from g2rpo.plan.report import render


@hydra.main(version_base="1.3", config_path="../../conf", config_name="plan")
def main(cfg: DictConfig) -> None:
    options = cfg.plan
    summary = with_levers(
        cfg,
        gpu(options.gpu),
        mfu=float(options.mfu),
        gpus_per_node=int(options.gpus_per_node),
        architecture=options.architecture,
        replayed=bool(options.replay),
        levers=bool(options.levers),
    )
    summary["overrides"] = list(HydraConfig.get().overrides.task)
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))
    print(f"written: {out}")


if __name__ == "__main__":
    main()

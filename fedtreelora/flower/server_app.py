"""The ServerApp: reads the experiment from the Flower run config and runs `PersonalisedStrategy`.

Run config keys ([tool.flwr.app.config] in the app's pyproject.toml, or `flwr run --run-config`):
- any `ExperimentConfig` field, with "-" or "_" (`num-clients = 4`, `lora_r = 8`); lists
  (`target-modules`) as a comma-separated string;
- `config-file`: a YAML/JSON experiment file read first (the keys above override it);
- `method` (default "fedtreelora"), `run-dir` (default "runs/flower"), `round-timeout` (seconds a
  round waits for replies, 0 = forever), `connect-timeout`, `resume` (continue from checkpoints);
- `dataset-fn` ("module:function") is read by the ClientApps, not here.
"""
from __future__ import annotations

import dataclasses

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..federation.config import ExperimentConfig
from .strategy import PersonalisedStrategy

APP_KEYS = {"config-file", "method", "run-dir", "round-timeout", "connect-timeout", "resume", "dataset-fn"}


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    """ExperimentConfig from a Flower run config (see the module docstring); unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    values = ExperimentConfig.from_file(run_config["config-file"]).to_dict() if run_config.get("config-file") else {}
    unknown = []
    for key, value in run_config.items():
        if key in APP_KEYS:
            continue
        name = key.replace("-", "_")
        if name not in fields:
            unknown.append(key)
            continue
        if isinstance(value, str) and isinstance(getattr(ExperimentConfig(), name), list):
            value = [v.strip() for v in value.split(",") if v.strip()]
        values[name] = value
    if unknown:
        raise ValueError(f"unknown run config key(s) {sorted(unknown)}; use ExperimentConfig fields "
                         f"({', '.join(sorted(fields))}) or {sorted(APP_KEYS)}")
    return ExperimentConfig.from_dict(values)


def server_app(config: ExperimentConfig | None = None, method: str | None = None, run_dir: str | None = None,
               **strategy_options) -> ServerApp:
    """A ServerApp; arguments given here win over the run config (handy with `flwr.simulation.run_simulation`,
    which passes no run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = dict(context.run_config)
        options = {"round_timeout": float(rc.get("round-timeout", 600)) or None,
                   "connect_timeout": float(rc.get("connect-timeout", 300)),
                   "resume": bool(rc.get("resume", False)), **strategy_options}
        strategy = PersonalisedStrategy(config if config is not None else config_from_run_config(rc),
                                        method or str(rc.get("method", "fedtreelora")),
                                        run_dir or str(rc.get("run-dir", "runs/flower")), **options)
        strategy.start(grid)

    return app


# `flwr run` entry point (pyproject: serverapp = "fedtreelora.flower.server_app:app")
app = server_app()

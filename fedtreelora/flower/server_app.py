"""The experiment's ServerApp: reads the experiment from the Flower run config and runs it on the Grid.

The run is `experiment.Experiment`, the code `fedtreelora simulate` runs in process: the warm-up,
then each method's rounds under flwr's `Strategy.start`, the same checkpoints and run folder
(`metrics.json` records `"engine": "flower"` and every failed reply).

Run config keys ([tool.flwr.app.config] in the app's pyproject.toml, or `flwr run --run-config`):
- any `ExperimentConfig` field, with "-" or "_" (`num-clients = 4`, `lora_r = 8`); lists
  (`target-modules`) as a comma-separated string;
- `config-file`: a YAML/JSON experiment file read first (the keys above override it);
- `method` (default "fedtreelora"; several as "fedtreelora,local": one shared warm-up), `run-dir`
  (default "runs/flower"), `round-timeout` (seconds a round waits for replies, 0 = forever),
  `connect-timeout`, `resume` (continue from the checkpoints; the run's config must be the same);
- `dataset-fn` ("module:function") is read by the ClientApps, not here.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..federation.config import ExperimentConfig
from ..federation.methods import make_method
from ..federation.schedule import check_run_folder
from .experiment import Experiment

APP_KEYS = {"config-file", "method", "run-dir", "round-timeout", "connect-timeout", "resume", "dataset-fn"}


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    """ExperimentConfig from a Flower run config (see the module docstring); unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    values = ExperimentConfig.read_file(run_config["config-file"]) if run_config.get("config-file") else {}
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


def run_on_grid(grid: Grid, config: ExperimentConfig, methods: list[str], run_dir: str | Path, *,
                round_timeout: float | None = 600.0, connect_timeout: float = 300.0, resume: bool = False) -> dict:
    """The experiment over a Flower Grid: waits for `num_clients` nodes, runs the warm-up and every
    method, writes the run folder (refusing one that holds another run) and returns its summary."""
    for name in methods:
        make_method(name)                     # fails on a typo before any node is contacted
    run_dir = Path(run_dir)
    check_run_folder(run_dir, config, resume)
    n = config.num_clients
    deadline = time.monotonic() + connect_timeout
    while len(list(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    connected = len(list(grid.get_node_ids()))
    if connected < n:
        raise RuntimeError(f"only {connected} SuperNode(s) connected within {connect_timeout:.0f} s; the experiment "
                           f"has num_clients={n}")
    experiment = Experiment(grid, config, run_dir, resume=resume, timeout=round_timeout, engine="flower")
    experiment.warmup()
    return experiment.summary({name: experiment.run_method(name) for name in methods})


def server_app(config: ExperimentConfig | None = None, method: str | None = None, run_dir: str | None = None,
               **options) -> ServerApp:
    """A ServerApp; arguments given here win over the run config (handy with `flwr.simulation.run_simulation`,
    which passes no run config). `options`: `round_timeout`, `connect_timeout`, `resume` of `run_on_grid`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = dict(context.run_config)
        options_ = {"round_timeout": float(rc.get("round-timeout", 600)) or None,
                    "connect_timeout": float(rc.get("connect-timeout", 300)),
                    "resume": bool(rc.get("resume", False)), **options}
        names = [m.strip() for m in str(method or rc.get("method", "fedtreelora")).split(",") if m.strip()]
        run_on_grid(grid, config if config is not None else config_from_run_config(rc), names,
                    run_dir or str(rc.get("run-dir", "runs/flower")), **options_)

    return app


# `flwr run` entry point (pyproject: serverapp = "fedtreelora.flower.server_app:app")
app = server_app()

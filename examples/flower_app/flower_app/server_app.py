"""ServerApp: FlowerTune's, with the strategy line changed to FedTreeLoRA."""
from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict

from fedtreelora import TreeConfig
from fedtreelora.flower import FedTreeLoRA, to_arrayrecord

from .task import get_model

app = ServerApp()


def save_experts(save_path: Path, last_round: int):
    """experts_fn: every node's cluster and external expert of the last round, as safetensors."""
    def save(server_round, experts):
        if server_round != last_round:
            return
        from safetensors.torch import save_file
        for node, (cluster, external) in experts.items():
            folder = save_path / f"node_{node}"
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous().clone() for k, v in cluster.items()}, str(folder / "cluster.safetensors"))
            if external is not None:
                save_file({k: v.contiguous().clone() for k, v in external.items()}, str(folder / "external.safetensors"))
    return save


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    num_rounds = int(rc["num-server-rounds"])
    save_path = Path(str(rc["save-path"]))
    model = get_model(rc)
    initial = to_arrayrecord(get_peft_model_state_dict(model))

    # Define strategy: FedTreeLoRA where FlowerTune has FedAvg
    strategy = FedTreeLoRA(tree_config=TreeConfig(tau=float(rc["tree.tau"]), window=int(rc["tree.window"])),
                           warmup_rounds=int(rc["warmup-rounds"]), fraction_train=float(rc["fraction-train"]),
                           fraction_evaluate=float(rc["fraction-evaluate"]), min_train_nodes=int(rc["min-nodes"]),
                           min_evaluate_nodes=int(rc["min-nodes"]), min_available_nodes=int(rc["min-nodes"]),
                           seed=int(rc["seed"]),
                           experts_fn=save_experts(save_path, num_rounds), run_dir=save_path,
                           resume=bool(rc["resume"]))

    # Start strategy: warm-up rounds, then personalised rounds (num_rounds counts both)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds,
                            timeout=float(rc["round-timeout"]) or None,
                            train_config=ConfigRecord({"save-path": str(save_path)}))

    save_path.mkdir(parents=True, exist_ok=True)
    strategy.tree.to_json(save_path / "tree.json")
    summary = {"tree": str(strategy.tree), "failures": strategy.failures,
               "evaluate": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
               "evaluate_per_node": {r: {str(n): m for n, m in per.items()} for r, per in strategy.evaluate_metrics.items()},
               "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()}}
    (save_path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(strategy.tree)

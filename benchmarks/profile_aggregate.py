"""One fedtreelora.aggregate() on a few hundred PEFT-like client state dicts, for `nsys profile -t cuda,nvtx`.

The clients come in planted groups whose LoRA B factors drift apart with depth, as the method assumes,
so the tree has a trunk and branches. The first aggregate() builds the tree (layer_distances, linkage,
cut_tree, silhouette, then tree_reduce); the following ones reuse it (tree_reduce only: the per-round
path). Each phase sits in its own NVTX range so that nsys's nvtx_sum separates them.

    nsys profile -t cuda,nvtx -o agg python benchmarks/profile_aggregate.py
    nsys stats --report nvtx_sum agg.nsys-rep
"""
from __future__ import annotations

import argparse
import time

import torch

import fedtreelora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_key(layer: int, module: str, factor: str) -> str:
    """A key as peft.get_peft_model_state_dict returns it for a RoBERTa-style encoder."""
    return f"base_model.model.roberta.encoder.layer.{layer}.attention.self.{module}.lora_{factor}.weight"


def client_states(n_clients: int, n_layers: int, hidden: int, rank: int, n_groups: int, dtype: torch.dtype,
                  device: torch.device, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    group = torch.arange(n_clients, device=device) % n_groups
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(n_clients)]
    for layer in range(n_layers):
        spread = layer / max(n_layers - 1, 1)  # shallow layers alike across groups, deep ones apart
        for module in ("query", "value"):
            a = torch.randn(n_clients, rank, hidden, generator=gen, device=device) * 0.01
            centres = torch.randn(n_groups, hidden, rank, generator=gen, device=device) * spread
            b = centres[group] + 0.1 * torch.randn(n_clients, hidden, rank, generator=gen, device=device)
            for k in range(n_clients):
                # Separate tensors per client, as each client's upload would be.
                states[k][lora_key(layer, module, "A")] = a[k].to(dtype).clone()
                states[k][lora_key(layer, module, "B")] = b[k].to(dtype).clone()
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="aggregate() calls with the stored tree after the first")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # torch.cuda.nvtx is a no-op without a device, so the script also runs (untimed ranges) on the CPU.
    nvtx_push = torch.cuda.nvtx.range_push if device.type == "cuda" else (lambda _name: None)
    nvtx_pop = torch.cuda.nvtx.range_pop if device.type == "cuda" else (lambda: None)

    states = client_states(args.clients, args.layers, args.hidden, args.rank, args.groups, DTYPES[args.dtype],
                           device, args.seed)
    weights = torch.randint(50, 500, (args.clients,)).double().tolist()  # sample counts
    n_params = sum(t.numel() for t in states[0].values())
    print(f"{args.clients} clients x {n_params:,} LoRA parameters ({args.layers} layers, q+v, r={args.rank}), "
          f"{args.dtype} on {device}")
    sync()

    nvtx_push("profile_aggregate::first (tree + reduce)")
    start = time.perf_counter()
    result = fedtreelora.aggregate(states, weights=weights)
    sync()
    first = time.perf_counter() - start
    nvtx_pop()
    print(f"first aggregate (builds the tree): {first * 1e3:.1f} ms; "
          f"clusters per layer (shallow to deep) {[int(c) for c in result.tree.n_clusters]}")

    times = []
    for r in range(args.rounds):
        nvtx_push(f"profile_aggregate::round {r} (stored tree)")
        start = time.perf_counter()
        fedtreelora.aggregate(states, weights=weights, tree=result.tree)
        sync()
        times.append(time.perf_counter() - start)
        nvtx_pop()
    if times:
        print(f"aggregate with the stored tree: best {min(times) * 1e3:.1f} ms of {len(times)}")
    sample = result.cluster_states[0]
    assert sample.keys() == states[0].keys(), "aggregate() changed the keys"
    assert all(v.device == device for v in sample.values()), "aggregate() moved the result off the input's device"


if __name__ == "__main__":
    main()

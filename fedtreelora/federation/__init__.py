"""The federated experiment: settings, data and partitions, the methods' server rules, the clients,
the in-process run and its checkpoints.

- `config`: `ExperimentConfig`, validated on construction;
- `data`: text datasets (offline BBC News or any HF dataset) and the client partitioners;
- `methods`: FedTreeLoRA and the baselines, one class per server rule;
- `pool`: `ClientPool`, the clients' data, model and trainer, the same in process and on Flower;
- `draws`: every random draw, from (seed, round, client);
- `schedule`: `run_experiment`, `fedtreelora simulate` in this process (the round loop itself is
  `fedtreelora.flower.strategy.PersonalisedStrategy`), selection and the result record;
- `checkpoints`: atomic, checksummed checkpoints of every round.
"""

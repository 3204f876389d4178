"""The federated experiment: settings, data and partitions, the methods' server rules, the round
schedule and its checkpoints.

- `config`: `ExperimentConfig`, validated on construction;
- `data`: text datasets (offline BBC News or any HF dataset) and the client partitioners;
- `methods`: FedTreeLoRA and the baselines, one class per server rule;
- `setup`: `ClientPool`, the clients' data, model and trainer, shared by both drivers;
- `schedule`: warm-up, rounds, selection and the result record (`run_experiment`);
- `checkpoints`: atomic, checksummed checkpoints of every round.
"""

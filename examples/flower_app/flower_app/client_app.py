"""ClientApp: an ordinary PEFT training loop; FedTreeLoRA adds the two marked calls."""
from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtreelora.flower import load_experts, make_reply, training_seed

from .task import batches, evaluate as evaluate_model, get_model, load_data

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = get_model(context.run_config)
    mixer = load_experts(model, msg, context)  # FedTreeLoRA: cluster expert, external expert, this node's lam
    data = load_data(context.run_config, context.node_config)
    rc = context.run_config
    lam = list(mixer.parameters())             # lam's logits at their own, higher rate (Adam moves a logit ~lr a step)
    lora = [p for p in model.parameters() if all(p is not q for q in lam)]
    optimizer = torch.optim.AdamW([{"params": lora}, {"params": lam, "lr": float(rc.get("train.mixing-learning-rate", 0.2))}],
                                  lr=float(rc["train.learning-rate"]))
    model.train()
    losses = []
    seed = training_seed(msg, context)         # the seed `fedtreelora simulate` gives this client in this round
    for batch, labels in batches(data.train_x, data.train_y, int(rc["train.batch-size"]), int(rc["train.local-steps"]),
                                 seed):
        loss = model(**batch, labels=labels).loss   # classification: the labels; causal LM: response tokens only
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return make_reply(model, msg, context, num_examples=len(data.train_y),   # FedTreeLoRA: the reply, lam kept here
                      metrics={"train-loss": sum(losses) / len(losses)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = get_model(context.run_config)
    load_experts(model, msg, context)          # its personalised model: the experts it was sent, its lam
    data = load_data(context.run_config, context.node_config)
    metrics = evaluate_model(model, context.run_config, data)   # accuracy or ROUGE-1, and the loss
    return make_reply(model, msg, context, num_examples=len(data.test_y), metrics=metrics)

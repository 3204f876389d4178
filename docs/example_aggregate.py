"""README example: one round of FedTreeLoRA aggregation on PEFT LoRA state dicts (runs as a test)."""
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification

import fedtreelora as ftl

# Six clients fine-tuned the same small BERT with LoRA; here their adapters are random stand-ins.
base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                                intermediate_size=64, vocab_size=100, num_labels=3))
model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
template = get_peft_model_state_dict(model)
torch.manual_seed(0)
group_of = [0, 0, 0, 1, 1, 1]
centres = [{k: torch.randn_like(v) for k, v in template.items()} for _ in range(2)]
client_states = {f"client{k}": {key: centres[g][key] * (".layer.3." in key) + 0.1 * torch.randn_like(v)
                                for key, v in template.items()} for k, g in enumerate(group_of)}
sample_counts = [120, 80, 200, 95, 60, 150]

# Round 1: build the tree (B factors, per-layer Frobenius distances, average linkage, layer-wise cuts).
config = ftl.TreeConfig(linkage="average", window=3, tau=0.1)
tree = ftl.build_tree(client_states, config=config)
print(tree)                      # per layer: how many clusters, and who is in them
tree.plot("tree.png")           # dendrogram with each layer's cut

# Every round: cluster and external experts per client, with the stored tree (no new distances).
res = ftl.aggregate(client_states, weights=sample_counts, tree=tree)
mine = res.cluster_states["client0"]        # same keys/shapes/dtype as the upload; load with set_peft_model_state_dict
others = res.external_states["client0"]     # None if client0's cluster is everyone at every layer
assert tree.n_clusters.tolist() == [1, 1, 1, 2] and others is not None

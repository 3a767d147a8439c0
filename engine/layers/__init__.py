"""Building blocks of the models: tensor-parallel linears and embeddings, norms, RoPE, activations,
and the mixture-of-experts MLP (moe.py).

Every parameter carries its own `weight_loader(param, loaded_weight[, shard_id])`
that cuts this rank's slice out of the full checkpoint tensor, so the loader is a
plain loop over the checkpoint's tensors.
"""

"""Small models built from configs (nothing downloaded) and PEFT-side helpers shared by the tests."""

import copy

import torch

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, **overrides,
    })
    return LlamaForCausalLM(config).eval()


def tokens(batch=2, length=16, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_lora_weights(peft_model, fastlora_model):
    """Give fastlora's adapters PEFT's values (PEFT keys carry the adapter name 'default')."""
    state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for name, layer in fastlora_model.lora_layers():
            layer.lora_A.copy_(state[f"base_model.model.{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"base_model.model.{name}.lora_B.weight"])


def snapshot(model):
    """Everything a failed operation must leave unchanged: module types, tensors, requires_grad."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert params.keys() == before[1].keys()
    for name, (value, flag) in params.items():
        assert torch.equal(value, before[1][name][0]) and flag == before[1][name][1], name


def clone(model):
    return copy.deepcopy(model)

"""Small randomly initialised transformers models, built locally (nothing is downloaded)."""
import torch

VOCAB = 64


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def token_batch(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def randomize_adapters(model, seed: int = 2, std: float = 0.2) -> None:
    """Give every lora_A / lora_B weight random values, so adapters change outputs (B starts at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def snapshot(model):
    """What 'unchanged' means for a model: module types, parameter values and requires_grad."""
    return ([(name, type(m)) for name, m in model.named_modules()],
            {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()})


def assert_unchanged(model, before) -> None:
    types, params = snapshot(model)
    assert types == before[0], "module tree changed"
    assert params.keys() == before[1].keys(), "parameter names changed"
    for name, (value, requires_grad) in params.items():
        old_value, old_requires_grad = before[1][name]
        assert requires_grad == old_requires_grad, f"{name}: requires_grad changed"
        assert torch.equal(value, old_value), f"{name}: value changed"

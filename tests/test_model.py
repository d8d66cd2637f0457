"""The model's state-dict layout, parameter counts and loss against the original's definitions."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from clipcap.model import ClipCap, ClipCapConfig, build_model, count_parameters
from testing.reference import full_logits_loss


def gpt2_small(**overrides) -> GPT2LMHeadModel:
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(**overrides))


def meta_model(**config) -> ClipCap:
    with torch.device("meta"):
        return ClipCap(ClipCapConfig(**config), gpt2_small())


def test_gpt2_small_parameter_count():
    assert count_parameters(gpt2_small()) == 124_439_808


@pytest.mark.parametrize("config, mapper_params", [
    (dict(mapping_type="mlp", prefix_length=10, prefix_size=512), 31_468_800),
    (dict(mapping_type="mlp", prefix_length=10, prefix_size=640), 31_960_320),
    (dict(mapping_type="transformer", prefix_length=10, prefix_length_clip=10, prefix_size=640), 42_728_448),
    (dict(mapping_type="transformer", prefix_length=40, prefix_length_clip=40, prefix_size=640), 57_520_128),
])
def test_mapper_parameter_counts(config, mapper_params):
    model = meta_model(**config)
    assert count_parameters(model.clip_project) == mapper_params
    assert count_parameters(model) == mapper_params + 124_439_808


def test_mlp_state_dict_matches_original_layout():
    state = meta_model(mapping_type="mlp").state_dict()
    assert state["clip_project.model.0.weight"].shape == (3840, 512)
    assert state["clip_project.model.0.bias"].shape == (3840,)
    assert state["clip_project.model.2.weight"].shape == (7680, 3840)
    assert state["clip_project.model.2.bias"].shape == (7680,)
    assert {k for k in state if k.startswith("clip_project.")} == {
        "clip_project.model.0.weight", "clip_project.model.0.bias",
        "clip_project.model.2.weight", "clip_project.model.2.bias"}
    assert all(k.startswith(("gpt.", "clip_project.")) for k in state)
    assert "gpt.transformer.wte.weight" in state and "gpt.lm_head.weight" in state


def test_transformer_state_dict_matches_original_layout():
    state = meta_model(mapping_type="transformer", prefix_length=40, prefix_length_clip=40,
                       prefix_size=640).state_dict()
    mapper = {k: tuple(v.shape) for k, v in state.items() if k.startswith("clip_project.")}
    assert mapper["clip_project.linear.weight"] == (40 * 768, 640)
    assert mapper["clip_project.prefix_const"] == (40, 768)
    layer = "clip_project.transformer.layers.7."
    expected = {"norm1.weight": (768,), "norm1.bias": (768,), "attn.to_queries.weight": (768, 768),
                "attn.to_keys_values.weight": (1536, 768), "attn.project.weight": (768, 768),
                "attn.project.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,),
                "mlp.fc1.weight": (1536, 768), "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (768, 1536),
                "mlp.fc2.bias": (768,)}
    assert {k[len(layer):]: v for k, v in mapper.items() if k.startswith(layer)} == expected
    assert len(mapper) == 2 + 1 + 8 * len(expected)


def original_attention(layer, x):
    """The original's attention, written out with einsum, to hold the SDPA version against."""
    attn = layer.attn
    b, n, c = x.shape
    h = attn.num_heads
    q = attn.to_queries(x).reshape(b, n, h, c // h)
    kv = attn.to_keys_values(x).reshape(b, n, 2, h, c // h)
    k, v = kv[:, :, 0], kv[:, :, 1]
    weights = (torch.einsum("bnhd,bmhd->bnmh", q, k) * (c // h) ** -0.5).softmax(dim=2)
    return attn.project(torch.einsum("bnmh,bmhd->bnhd", weights, v).reshape(b, n, c))


def test_transformer_mapper_matches_einsum_reference(gpt2_dir):
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(lm=gpt2_dir, mapping_type="transformer", prefix_size=16,
                                      prefix_length=4, prefix_length_clip=3, num_layers=2, num_heads=4))
    mapper = model.clip_project
    clip = torch.randn(5, 16)
    x = torch.cat((mapper.linear(clip).view(5, 3, -1), mapper.prefix_const.expand(5, -1, -1)), dim=1)
    for layer in mapper.transformer.layers:
        x = x + original_attention(layer, layer.norm1(x))
        x = x + layer.mlp.fc2(torch.relu(layer.mlp.fc1(layer.norm2(x))))
    torch.testing.assert_close(model.prefix(clip), x[:, 3:])
    assert model.prefix(clip).shape == (5, 4, model.embed_dim)


def test_embedding_width_comes_from_gpt2(gpt2_dir):
    model = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=768, prefix_length=3))
    assert model.embed_dim == 32
    assert model.prefix(torch.randn(2, 768)).shape == (2, 3, 32)


def test_fast_loss_equals_full_logits_loss(gpt2_dir):
    """The fast loss (no mask, logits only where a token is predicted) equals the original's computation."""
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=16, prefix_length=4)).eval()
    tokens = torch.randint(1, 200, (3, 6))
    tokens[0, 0] = 0  # the real token "!" counts
    lengths = torch.tensor([6, 2, 4])
    clip = torch.randn(3, 16)
    positions = (torch.arange(6)[None] < lengths[:, None]).flatten().nonzero().squeeze(1)
    torch.testing.assert_close(model(clip, tokens, positions), full_logits_loss(model, clip, tokens, lengths))


def test_training_loss_reads_no_value_back_from_the_device(gpt2_dir):
    """Meta tensors hold no values, so any .item() or boolean mask in forward or backward fails on them;
    on a GPU each such read would stall the step until the device catches up."""
    model = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=16, prefix_length=4)).to("meta")
    tokens = torch.randint(1, 200, (3, 6))
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15])  # lengths 6, 2 and 4
    loss = model(torch.randn(3, 16, device="meta"), tokens.to("meta"), positions.to("meta"), reduction="sum")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert model.clip_project.model[0].weight.grad.device.type == "meta"


def test_only_prefix_freezes_gpt2(gpt2_dir):
    model = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=16, prefix_length=4, only_prefix=True))
    model.train()
    assert not model.gpt.training and model.clip_project.training
    assert not any(p.requires_grad for p in model.gpt.parameters())
    loss = model(torch.randn(2, 16), torch.randint(0, 200, (2, 5)), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    loss.backward()
    assert all(p.grad is None for p in model.gpt.parameters())
    assert all(p.grad is not None for p in model.clip_project.parameters())


def test_normalize_prefix_scales_out(gpt2_dir):
    model = build_model(ClipCapConfig(lm=gpt2_dir, prefix_size=16, prefix_length=2, normalize_prefix=True))
    clip = torch.randn(2, 16)
    torch.testing.assert_close(model.prefix(clip), model.prefix(clip * 7.5))


def test_heads_that_do_not_divide_the_width_are_one_line_before_gpt2_loads(gpt2_dir, monkeypatch):
    """``--num_heads 3`` with GPT-2's width 32: refused before GPT-2's weights load, naming a divisor to use."""
    from transformers import AutoModelForCausalLM

    from clipcap.files import ClipCapError

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("GPT-2 loaded first"))
    config = ClipCapConfig(lm=gpt2_dir, mapping_type="transformer", prefix_size=16, prefix_length=4, num_heads=3)
    with pytest.raises(ClipCapError, match=r"^num_heads 3 does not divide the mapper's width 32 \(the LM's, .*\): "
                                           r"choose a divisor of 32, such as 8$"):
        build_model(config)
    with pytest.raises(ClipCapError, match="^num_heads 5 does not divide the mapper's width 768"):
        meta_model(mapping_type="transformer", num_heads=5)  # built directly, as from a checkpoint
    assert meta_model(mapping_type="transformer", num_heads=3).clip_project.transformer.layers[0].attn.num_heads == 3


def test_backbone_paths_are_absolute_in_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "backbones" / "gpt2").mkdir(parents=True)
    config = ClipCapConfig(lm="backbones/gpt2", clip_model="ViT-B/32")
    assert config.lm == str(tmp_path / "backbones" / "gpt2") and config.clip_model == "ViT-B/32"  # a Hub name stays
    assert ClipCapConfig(gpt2="backbones/gpt2").lm == config.lm  # the name of earlier versions
    config.clip_model = "backbones"
    assert config.to_dict()["clip_model"] == str(tmp_path / "backbones")

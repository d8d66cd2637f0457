"""Any decoder-only LM behind the prefix: decoding against transformers' own ``generate``, the loss, training,
checkpoints, half-precision weights and LoRA, on tiny random models of several architectures.

Each architecture's model and tokenizer are made once per session from a config (testing.tiny.make_tiny_lm),
so nothing is downloaded. Llama's, OPT's and Gemma's tokenizers start every text with BOS, as the real ones do.
"""
import json
import shutil

import pytest
import torch
from conftest import caption_corpus, write_feature_pickle
from safetensors import safe_open

from clipcap import lm as lms
from clipcap.captioner import Captioner
from clipcap.checkpoint import load_checkpoint, parse_config, save_checkpoint
from clipcap.data import CaptionDataset, load_features
from clipcap.decoding import DecodingOptions, beam_tokens, caption_embeddings, greedy_tokens, stop_tokens
from clipcap.files import ClipCapError
from clipcap.hub import save_pretrained
from clipcap.model import ClipCapConfig, build_model, load_tokenizer, merge_lora
from clipcap.training import TrainConfig
from testing.reference import full_logits_loss, original_beam
from testing.tiny import BOS_FIRST, TINY_LMS, make_tiny_lm

ARCHITECTURES = list(TINY_LMS)
DIM = 16


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """``lm_dir(model_type)``: the folder of a tiny random LM of that type and its tokenizer, made once a session."""
    made = {}

    def get(model_type: str) -> str:
        if model_type not in made:
            made[model_type] = str(make_tiny_lm(tmp_path_factory.mktemp(model_type), model_type, caption_corpus()))
        return made[model_type]

    return get


def tiny_model(lm_dir, model_type, **config):
    torch.manual_seed(0)
    return build_model(ClipCapConfig(lm=lm_dir(model_type), prefix_size=DIM, prefix_length=4, **config))


@pytest.fixture(scope="module")
def stopping(lm_dir):
    """``stopping(model_type)``: a tiny ClipCap (eval mode) and its tokenizer, whose LM says "." now and then, so
    that captions end at different lengths (a random LM almost never picks it: its output row is scaled up)."""
    made = {}

    def get(model_type: str):
        if model_type not in made:
            model, tokenizer = tiny_model(lm_dir, model_type).eval(), load_tokenizer(lm_dir(model_type))
            with torch.no_grad():
                head = model.gpt.get_output_embeddings().weight
                head[lms.period_token(tokenizer)] *= 3
            made[model_type] = model, tokenizer
        return made[model_type]

    return get


def embeds(n: int = 8) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(1))


def cut(tokens: list[int], stops: tuple[int, ...]) -> list[int]:
    """``generate``'s tokens up to and with the first stop token (it pads finished rows after it)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i + 1]
    return tokens


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_greedy_equals_transformers_generate(stopping, model_type):
    """The cached, batched greedy decoder (rows leave the batch as they stop) gives token for token what the LM's
    own ``generate`` gives from the same prompt, stopping at "." or end-of-text."""
    model, tokenizer = stopping(model_type)
    stops = stop_tokens(tokenizer, "period")
    assert stops == (lms.period_token(tokenizer), tokenizer.eos_token_id)
    ours = greedy_tokens(model, embeds(), max_length=20, stop_token=stops)
    assert len({len(t) for t in ours}) >= 2  # images stop at different steps
    with torch.no_grad():
        prompt = model.prompt_embeds(embeds())
        mask = torch.ones(prompt.shape[:2], dtype=torch.long)
        generated = model.gpt.generate(inputs_embeds=prompt, attention_mask=mask, do_sample=False,
                                       eos_token_id=list(stops), max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    assert ours == [cut(row, stops) for row in generated.tolist()]


@pytest.mark.parametrize("model_type", ["opt", "llama", "qwen2"])
def test_beam_equals_the_reference_beam(stopping, model_type):
    """Batched beam search with the cache equals the original's beam rules run without a cache, one image at a time."""
    model, tokenizer = stopping(model_type)
    stops = stop_tokens(tokenizer, "period")
    expected = [original_beam(model, e, max_length=12, stop_token=stops) for e in embeds(6)]
    assert any(tokens[-1] in stops for beams in expected for tokens, _ in beams)
    got = beam_tokens(model, embeds(6), max_length=12, stop_token=stops)
    assert [[t for t, _ in b] for b in got] == [[t for t, _ in b] for b in expected]
    for beams, ref in zip(got, expected):
        assert [s for _, s in beams] == pytest.approx([s for _, s in ref], abs=1e-5)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_fast_loss_equals_full_logits_loss(lm_dir, model_type):
    """The loss from the decoder body and the output head where a token is predicted (Gemma 2's logit soft cap
    included) equals cross-entropy over the LM's own logits under a mask, BOS first where the LM takes one."""
    model = tiny_model(lm_dir, model_type).eval()
    assert model.config.lm_bos == (model_type in BOS_FIRST)
    assert model.config.lm_config["model_type"] == model_type
    tokens = torch.randint(2, 200, (3, 6), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([6, 2, 4])
    clip = torch.randn(3, DIM)
    positions = (torch.arange(6)[None] < lengths[:, None]).flatten().nonzero().squeeze(1)
    torch.testing.assert_close(model(clip, tokens, positions), full_logits_loss(model, clip, tokens, lengths))


@pytest.fixture(scope="module")
def captions_data(tmp_path_factory):
    corpus = caption_corpus()
    return write_feature_pickle(tmp_path_factory.mktemp("data") / "train.pkl",
                                [[corpus[i * 7], corpus[i * 7 + 3]] for i in range(8)], dim=DIM)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_training_steps_lower_the_loss(lm_dir, captions_data, model_type):
    """A few optimizer steps on captions tokenised by the LM's own tokenizer (no BOS among the caption's tokens:
    it goes before the prefix) give a finite loss that goes down."""
    model, tokenizer = tiny_model(lm_dir, model_type).train(), load_tokenizer(lm_dir(model_type))
    batch = CaptionDataset(load_features(captions_data), tokenizer)[range(16)]
    assert tokenizer.bos_token_id not in batch.tokens[:, 0].tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(batch.embeddings, batch.tokens, batch.positions)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_bos_goes_before_the_prefix(lm_dir):
    """An LM whose tokenizer starts every text with BOS reads BOS, then the prefix; the others the prefix alone."""
    llama, qwen = tiny_model(lm_dir, "llama").eval(), tiny_model(lm_dir, "qwen2").eval()
    clip = torch.randn(2, DIM)
    assert (llama.prompt_length, qwen.prompt_length) == (5, 4)
    bos = llama.gpt.get_input_embeddings().weight[load_tokenizer(lm_dir("llama")).bos_token_id]
    torch.testing.assert_close(llama.prompt_embeds(clip), torch.cat((bos.expand(2, 1, -1), llama.prefix(clip)), 1))
    torch.testing.assert_close(qwen.prompt_embeds(clip), qwen.prefix(clip))


def test_whole_checkpoint_of_another_lm_rebuilds_offline(lm_dir, tmp_path):
    """A fine-tuned Qwen2 is stored whole, its architecture recorded: it loads with its LM's folder gone. The
    original's .pt format is GPT-2's alone."""
    model = tiny_model(lm_dir, "qwen2").eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(ClipCapError, match=r"^the original's \.pt format holds GPT-2 without adapters, not a qwen2 LM"):
        save_checkpoint(model, tmp_path / "m.pt")
    moved = shutil.copytree(lm_dir("qwen2"), tmp_path / "qwen2")
    model.config.lm = str(moved)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    shutil.rmtree(moved)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    clip, tokens = torch.randn(2, DIM), torch.randint(2, 200, (2, 5))
    torch.testing.assert_close(loaded(clip, tokens), model(clip, tokens))


@pytest.mark.parametrize("field, value, message", [
    ("intermediate_size", 48, r"config lm_config does not fit the weights: gpt\.model\.layers\.0\.mlp\.\w+\.weight has "
                              r"shape \(\d+, \d+\), the config gives"),
    ("num_hidden_layers", 3, "config lm_config num_hidden_layers 3 does not fit the weights, whose shapes give 2"),
    ("num_key_value_heads", 4, r"config lm_config num_key_value_heads 4 disagrees with .*llama.*, the LM these "
                               "weights were fine-tuned from, which has 2"),
    ("rope_theta_typo", 1.0, "config lm_config has an unknown field 'rope_theta_typo' \\(not one of LlamaConfig's\\)"),
])
def test_lm_config_that_does_not_fit_is_one_line(lm_dir, tmp_path, field, value, message):
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tiny_model(lm_dir, "llama"), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["clipcap_config"])
    config["lm_config"][field] = value
    save_file(load_file(str(path)), str(path), metadata={"clipcap_config": json.dumps(config)})
    with pytest.raises(ClipCapError, match=f"^{path}: {message}") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_configs_of_gpt2_only_versions_still_load(gpt2_dir):
    """``gpt2`` and ``gpt2_config`` (GPT-2's sizes, no model type) are read as ``lm`` and ``lm_config``."""
    config = parse_config({"gpt2": gpt2_dir, "prefix_size": DIM, "gpt2_config": {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "bos_token_id": 50256, "eos_token_id": 50256}}, "old.json")
    assert config.lm == gpt2_dir and config.lm_config["model_type"] == "gpt2" and config.lm_config["n_head"] == 12
    assert TrainConfig.from_flat({"gpt2": gpt2_dir}).model.lm == gpt2_dir  # an older run's settings, resumed


def lora_model(lm_dir, model_type="llama", **config):
    """A LoRA model whose adapters are not zero (as after training), so that they change the outputs."""
    model = tiny_model(lm_dir, model_type, lora_rank=4, **config)
    with torch.no_grad():
        for name, p in model.gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("config, message", [
    (dict(lora_rank=4, lora_targets="no_such_proj"), "^--lora_targets no_such_proj: "),
    (dict(lora_rank=4, only_prefix=True), "^--lora_rank trains adapters on the LM, --only_prefix freezes it"),
])
def test_lora_settings_that_cannot_work_are_one_line(lm_dir, config, message):
    with pytest.raises(ClipCapError, match=message) as error:
        tiny_model(lm_dir, "llama", **config)
    assert "\n" not in str(error.value)


def test_lora_trains_only_the_adapters_and_the_mapper(lm_dir, captions_data):
    model, tokenizer = tiny_model(lm_dir, "llama", lora_rank=4).train(), load_tokenizer(lm_dir("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("clip_project.") or lms.is_adapter_key(n) for n in trainable)
    assert any(".self_attn.q_proj.lora_A" in n for n in trainable)
    assert any(".mlp.down_proj.lora_B" in n for n in trainable)
    batch = CaptionDataset(load_features(captions_data), tokenizer)[range(8)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(batch.embeddings, batch.tokens, batch.positions).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k in trainable}


def test_lora_checkpoint_holds_the_mapper_and_adapters_and_reloads(lm_dir, tmp_path):
    """The file holds the mapper and the adapters and names the LM (and its commit, for a Hub LM); reloaded, it
    captions as before; merged into the LM, the logits are the same, and it saves as a whole model."""
    model = lora_model(lm_dir)
    path = save_checkpoint(model, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        config = json.loads(f.metadata()["clipcap_config"])
    assert keys and all(k.startswith("clip_project.") or lms.is_adapter_key(k) for k in keys)
    assert any(lms.is_adapter_key(k) for k in keys)
    assert path.stat().st_size < sum(p.numel() * 4 for p in model.gpt.parameters()) / 2
    assert (config["lm"], config["lm_revision"], config["lora_rank"]) == (lm_dir("llama"), "", 4)
    tokenizer = load_tokenizer(lm_dir("llama"))
    options = DecodingOptions("beam", max_length=8, num_captions=2)
    expected = caption_embeddings(model, tokenizer, embeds(4), options)
    folder = save_pretrained(model, tmp_path / "hub")
    values = json.loads((folder / "config.json").read_text())
    assert (values["lora_rank"], values["lora_targets"], values["lm_dtype"]) == (4, "all-linear", "float32")
    assert "frozen, with LoRA adapters (rank 4, alpha 16, on all-linear)" in (folder / "README.md").read_text()
    reloaded = Captioner.from_pretrained(folder)
    assert reloaded.model.config == model.config
    assert reloaded.caption_embeddings(embeds(4), options) == expected
    clip, tokens = torch.randn(2, DIM), torch.randint(2, 200, (2, 5))
    logits = model(clip, tokens)
    merged = merge_lora(model)
    assert not any(lms.is_adapter_key(k) for k in merged.state_dict()) and merged.config.lora_rank == 0
    torch.testing.assert_close(merged(clip, tokens), logits)
    assert Captioner.from_pretrained(path, merge_lora=True).caption_embeddings(embeds(4), options) == expected
    whole = load_checkpoint(save_checkpoint(merged, tmp_path / "merged.safetensors"))
    torch.testing.assert_close(whole(clip, tokens), logits)
    with pytest.raises(ClipCapError, match="holds GPT-2 without adapters, not LoRA adapters"):
        save_checkpoint(lora_model(lm_dir, "gpt2"), tmp_path / "m.pt")


def test_hub_lm_is_recorded_at_its_commit(lm_dir, tmp_path, monkeypatch):
    """An LM from the Hub (here from the cache, offline) is recorded with the commit it loaded from, which a
    mapper-only checkpoint and its Hub folder's config and card name, and which loading asks for."""
    from huggingface_hub import constants

    commit = "89abcdef" * 5
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    shutil.copytree(lm_dir("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    model = build_model(ClipCapConfig(lm="someone/tiny-llama", prefix_size=DIM, prefix_length=4, only_prefix=True))
    assert model.config.lm_revision == commit
    folder = save_pretrained(model, tmp_path / "model")
    assert json.loads((folder / "config.json").read_text())["lm_revision"] == commit
    assert f"`someone/tiny-llama` at commit `{commit}` (llama, 2 layers, width 32), frozen" in \
        (folder / "README.md").read_text()
    shutil.move(repo / "snapshots" / commit, repo / "snapshots" / ("0" * 40))  # that commit is no longer there
    with pytest.raises(ClipCapError, match=f"LM someone/tiny-llama: cannot .*{commit}"):
        Captioner.from_pretrained(folder)


def test_half_precision_weights_for_a_frozen_lm(lm_dir, captions_data):
    """``lm_dtype`` bfloat16: the LM's weights in bf16, the mapper in float32, training the mapper works; for a
    fine-tuned LM, training refuses it in one line."""
    model = tiny_model(lm_dir, "llama", only_prefix=True, lm_dtype="bfloat16").train()
    assert {p.dtype for p in model.gpt.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.clip_project.parameters()} == {torch.float32}
    batch = CaptionDataset(load_features(captions_data), load_tokenizer(lm_dir("llama")))[range(8)]
    loss = model(batch.embeddings, batch.tokens, batch.positions)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in model.clip_project.parameters())
    assert greedy_tokens(model.eval(), embeds(2), max_length=5)
    with pytest.raises(ClipCapError, match="^--lm_dtype bfloat16: half-precision weights are for a frozen LM"):
        TrainConfig(model=ClipCapConfig(lm_dtype="bfloat16")).check()
    lora = tiny_model(lm_dir, "llama", lora_rank=4, lm_dtype="bfloat16")  # the optimizer updates float32 adapters
    assert {p.dtype for n, p in lora.gpt.named_parameters() if lms.is_adapter_key(n)} == {torch.float32}
    assert {p.dtype for n, p in lora.gpt.named_parameters() if not lms.is_adapter_key(n)} == {torch.bfloat16}


def test_gradient_checkpointing_gives_the_same_gradients(lm_dir, captions_data):
    batch = CaptionDataset(load_features(captions_data), load_tokenizer(lm_dir("llama")))[range(8)]
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(lm_dir, "llama").train()
        if checkpointing:
            lms.checkpoint_activations(model.gpt)
        model(batch.embeddings, batch.tokens, batch.positions).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_train_with_lora_from_the_command_line(lm_dir, captions_data, tmp_path):
    """train.py's flags end to end: --lm with LoRA and gradient checkpointing; the run's checkpoint holds the
    mapper and the adapters, and captions through the API; the original's format is refused for another LM."""
    from clipcap.cli.train import main

    flags = ["--data", str(captions_data), "--lm", lm_dir("llama"), "--bs", "4", "--epochs", "1", "--lr", "1e-2",
             "--warmup", "1", "--prefix_length", "4"]
    with pytest.raises(ClipCapError, match="^--save_original_format: the original's .pt format holds GPT-2 without"):
        main(flags + ["--out_dir", str(tmp_path / "pt"), "--lora_rank", "4", "--save_original_format"])
    with pytest.raises(ClipCapError, match=r"^--save_original_format: the original's \.pt format holds GPT-2, not "):
        main(flags + ["--out_dir", str(tmp_path / "pt"), "--save_original_format"])
    result = main(flags + ["--out_dir", str(tmp_path / "run"), "--lora_rank", "4", "--lora_targets", "q_proj,v_proj",
                           "--gradient_checkpointing"])
    with safe_open(result["checkpoint"], framework="pt") as f:
        keys = set(f.keys())
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in keys if lms.is_adapter_key(k)}
    assert adapted == {"q_proj", "v_proj"} and all(k.startswith("clip_project.") or lms.is_adapter_key(k) for k in keys)
    captioner = Captioner.from_pretrained(result["checkpoint"])
    assert captioner.model.config.lora_targets == "q_proj,v_proj" and captioner.model.config.lm_bos
    assert captioner.caption_embeddings(embeds(2), strategy="greedy", max_length=6)


def test_predict_with_a_lora_checkpoint(lm_dir, captions_data, tmp_path, capsys):
    """predict.py captions with a LoRA checkpoint as it is, merged (--merge_lora) or in bf16 (--lm_dtype): the
    same captions merged, one per image each way."""
    from clipcap.cli.predict import main

    path = save_checkpoint(lora_model(lm_dir), tmp_path / "lora.safetensors")
    runs = {}
    for name, flags in (("as saved", []), ("merged", ["--merge_lora"]), ("bf16", ["--lm_dtype", "bfloat16"])):
        main(["--checkpoint", str(path), "--features", str(captions_data), "--greedy", "--max_length", "6", *flags])
        runs[name] = capsys.readouterr().out.rstrip("\n").split("\n")
    assert runs["merged"] == runs["as saved"] and len(runs["as saved"]) == 8 and len(runs["bf16"]) == 8


def test_web_page_captions_with_a_lora_checkpoint(lm_dir, clip_dir, tmp_path):
    """The web app serves a LoRA checkpoint of another LM (merged, as --merge_lora asks), captioning a sample as
    the Python API does."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from clipcap.app import create_app

    model = lora_model(lm_dir, clip_model=clip_dir)
    path = str(save_checkpoint(model, tmp_path / "lora.safetensors"))
    client = TestClient(create_app([path], merge_lora=True))
    answer = client.post("/api/caption", data={"checkpoint": path, "sample": "coffee", "strategy": "greedy",
                                               "max_length": "6"})
    assert answer.status_code == 200, answer.text
    sample = Image.open(io.BytesIO(client.get("/samples/coffee.png").content))
    assert answer.json()["captions"] == Captioner.from_pretrained(path).caption([sample], strategy="greedy",
                                                                              max_length=6)[0]

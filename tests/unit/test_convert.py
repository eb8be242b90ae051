"""`proclip convert` against a plain-torch forward of the upstream layout.

The reference below is written from the key layout of METHOD.md §8 and open_clip's VisionTransformer / upstream's
`TextProj` alone; it shares no code with train/convert.py, so a mapping slip (q/k/v order, a missing transpose, a
block index off by one) shows up as a numerical difference.
"""

import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F
from proclip_train.cli import main as cli_main
from proclip_train.hub.build.convert import (
    UnsupportedCheckpointError,
    convert_checkpoint,
    infer_layout,
    load_upstream_state_dict,
)
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

WIDTH, LAYERS, PATCH, IMAGE, MLP = 32, 2, 8, 32, 96  # matches tiny_clip_dir's vision tower (4 heads), MLP aside
HEADS = 4
H, R = 32, 2  # tiny_llm_dir's hidden size; adapter expansion
CLIP_D = 16  # tiny_clip_dir's projection_dim
CAPTIONS = ["a photo of a cat", "two brown dogs playing in the fresh snow at night, seen from far away"]


# ----------------------------------------------------------------------------------------------------------------
# Upstream layout: a random state dict and a plain-torch forward of it
# ----------------------------------------------------------------------------------------------------------------


def random_upstream_state_dict(n_blocks: int, d: int, seed: int = 0, width=WIDTH, layers=LAYERS, hidden=H) -> dict:
    """An open_clip CustomCLIP state dict: OpenAI ViT `visual.*`, `TextProj` `text.text_adaptor.*`, `logit_scale`."""
    g = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def small(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    grid = IMAGE // PATCH
    sd = {
        "logit_scale": torch.tensor(3.1),
        "visual.class_embedding": small(width) * 5,
        "visual.conv1.weight": torch.randn(width, 3, PATCH, PATCH, generator=g) / math.sqrt(3 * PATCH * PATCH),
        "visual.positional_embedding": small(grid * grid + 1, width) * 5,
        "visual.ln_pre.weight": 1 + small(width), "visual.ln_pre.bias": small(width),
        "visual.ln_post.weight": 1 + small(width), "visual.ln_post.bias": small(width),
        "visual.proj": weight(width, d),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": 1 + small(width), p + "ln_1.bias": small(width),
            p + "attn.in_proj_weight": weight(3 * width, width) * 2, p + "attn.in_proj_bias": small(3 * width),
            p + "attn.out_proj.weight": weight(width, width), p + "attn.out_proj.bias": small(width),
            p + "ln_2.weight": 1 + small(width), p + "ln_2.bias": small(width),
            p + "mlp.c_fc.weight": weight(MLP, width), p + "mlp.c_fc.bias": small(MLP),
            p + "mlp.c_proj.weight": weight(width, MLP), p + "mlp.c_proj.bias": small(width),
        })
    for k in range(n_blocks):
        p = f"text.text_adaptor.{k}."
        sd.update({
            p + "ln.weight": 1 + small(hidden), p + "ln.bias": small(hidden),
            p + "fn.0.weight": weight(R * hidden, hidden), p + "fn.0.bias": small(R * hidden),
            p + "fn.3.weight": weight(hidden, R * hidden), p + "fn.3.bias": small(hidden),
        })
    sd[f"text.text_adaptor.{n_blocks}.weight"] = 1 + small(hidden)
    sd[f"text.text_adaptor.{n_blocks}.bias"] = small(hidden)
    sd[f"text.text_adaptor.{n_blocks + 1}.weight"] = weight(d, hidden)
    sd[f"text.text_adaptor.{n_blocks + 1}.bias"] = small(d)
    return sd


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-5)


def _linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def openclip_vit_reference(sd, pixel_values, heads=HEADS, activation="quick_gelu"):
    """open_clip's OpenAI VisionTransformer, CLS pooling, `@ proj`: (B, 3, S, S) -> (B, D)."""
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if activation == "quick_gelu" else F.gelu
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixel_values, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)  # (B, grid², W)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _layer_norm(x, sd, "visual.ln_pre")
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"visual.transformer.resblocks.{i}."
        qkv = _layer_norm(x, sd, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + _linear((attention @ v).transpose(1, 2).flatten(2), sd, p + "attn.out_proj")
        x = x + _linear(act(_linear(_layer_norm(x, sd, p + "ln_2"), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")
        i += 1
    return _layer_norm(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def text_proj_reference(sd, llm_embeds, l2_norm=True):
    """Upstream `TextProj.forward`: (B, H) pooled LLM embeddings -> (B, D)."""
    x = F.normalize(llm_embeds, p=2, dim=-1) if l2_norm else llm_embeds
    k = 0
    while f"text.text_adaptor.{k}.ln.weight" in sd:
        p = f"text.text_adaptor.{k}."
        x = x + _linear(F.gelu(_linear(_layer_norm(x, sd, p + "ln"), sd, p + "fn.0")), sd, p + "fn.3")
        k += 1
    return _linear(_layer_norm(x, sd, f"text.text_adaptor.{k}"), sd, f"text.text_adaptor.{k + 1}")


def mean_pooled_llm_embeddings(llm_dir, captions):
    """Each caption alone through the HF LLM (no padding at all), mean over its tokens."""
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm = AutoModel.from_pretrained(llm_dir).eval()
    with torch.no_grad():
        return torch.cat([llm(**tokenizer(c, return_tensors="pt")).last_hidden_state.mean(1) for c in captions])


# ----------------------------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_blocks, d, activation, normalize, file_format",
    [
        (1, CLIP_D, "quick_gelu", True, "pt"),
        (4, CLIP_D, "quick_gelu", True, "wrapped_pt"),
        (1, 1280, "quick_gelu", True, "safetensors"),
        (4, 1280, "quick_gelu", True, "pt"),
        (1, CLIP_D, "gelu", False, "safetensors"),
    ],
)
def test_converted_matches_upstream_forward(
    tmp_path, tiny_clip_dir, tiny_llm_dir, n_blocks, d, activation, normalize, file_format
):
    sd = random_upstream_state_dict(n_blocks, d, seed=n_blocks * 7 + d)
    if file_format == "safetensors":
        checkpoint = tmp_path / "upstream.safetensors"
        save_file(sd, checkpoint)
    elif file_format == "wrapped_pt":  # an open_clip training checkpoint saved under DDP
        checkpoint = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, checkpoint)
    else:
        checkpoint = tmp_path / "upstream.pt"
        torch.save(sd, checkpoint)
    out = tmp_path / "converted"
    argv = ["convert", "--checkpoint", str(checkpoint), "--text", str(tiny_llm_dir), "--out", str(out),
            "--vision-config", str(tiny_clip_dir), "--activation", activation]
    cli_main(argv + ([] if normalize else ["--no-normalize-input"]))

    assert (out / "modeling_proclip.py").is_file() and (out / "processor_config.json").is_file()
    model = ProCLIPModel.from_pretrained(out).eval()
    processor = ProCLIPProcessor.from_pretrained(out)
    config = model.config
    assert (config.adapter_blocks, config.adapter_expansion, config.projection_dim) == (n_blocks, R, d)
    assert config.adapter_normalize_input is normalize
    assert config.vision_config.hidden_act == activation
    assert config.vision_config.num_attention_heads == HEADS
    assert config.vision_config.intermediate_size == MLP
    assert processor.image_processor.crop_size == {"height": IMAGE, "width": IMAGE}
    assert model.logit_scale.item() == pytest.approx(3.1)

    pixel_values = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    batch = processor(text=CAPTIONS, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values).pooler_output
        text = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        expected_image = openclip_vit_reference(sd, pixel_values, activation=activation)
        expected_text = text_proj_reference(sd, mean_pooled_llm_embeddings(tiny_llm_dir, CAPTIONS), normalize)
    assert image.shape == text.shape == (2, d)
    torch.testing.assert_close(image, expected_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text, expected_text, atol=1e-4, rtol=1e-4)


def test_openai_vit_table_gives_heads_without_vision_config():
    """Shapes alone (meta tensors: no memory) identify OpenAI's ViTs and LLM2CLIP's D = 1280, r = 2, 4 blocks."""
    def meta_upstream(width, layers, patch, image):
        grid = image // patch
        sd = {
            "visual.conv1.weight": (width, 3, patch, patch), "visual.positional_embedding": (grid * grid + 1, width),
            "visual.proj": (width, 1280), "text.text_adaptor.0.fn.0.weight": (8192, 4096),
            "text.text_adaptor.5.weight": (1280, 4096),
        }
        sd.update({f"visual.transformer.resblocks.{i}.mlp.c_fc.weight": (4 * width, width) for i in range(layers)})
        return {key: torch.empty(shape, device="meta") for key, shape in sd.items()}

    cases = {(768, 12, 32, 224): 12, (768, 12, 16, 224): 12, (1024, 24, 14, 224): 16, (1024, 24, 14, 336): 16}
    for (width, layers, patch, image), heads in cases.items():
        layout = infer_layout(meta_upstream(width, layers, patch, image))
        assert (layout.heads, layout.width, layout.layers, layout.image_size) == (heads, width, layers, image)
        assert (layout.projection_dim, layout.text_hidden_size, layout.adapter_expansion, layout.adapter_blocks) == (
            1280, 4096, 2, 4
        )
    with pytest.raises(UnsupportedCheckpointError, match="--vision-config"):
        infer_layout(meta_upstream(640, 12, 16, 224))


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------


def _convert(tmp_path, sd, llm_dir, clip_dir):
    checkpoint = tmp_path / "upstream.pt"
    torch.save(sd, checkpoint)
    return convert_checkpoint(checkpoint, str(llm_dir), tmp_path / "out", vision_config=str(clip_dir))


def test_missing_keys_are_listed(tmp_path, tiny_clip_dir, tiny_llm_dir):
    sd = random_upstream_state_dict(2, CLIP_D)
    del sd["visual.transformer.resblocks.1.attn.in_proj_bias"], sd["text.text_adaptor.1.fn.3.weight"]
    with pytest.raises(UnsupportedCheckpointError, match="missing keys") as err:
        _convert(tmp_path, sd, tiny_llm_dir, tiny_clip_dir)
    assert "visual.transformer.resblocks.1.attn.in_proj_bias" in str(err.value)
    assert "text.text_adaptor.1.fn.3.weight" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_wrong_shapes_name_key_expected_and_got(tmp_path, tiny_clip_dir, tiny_llm_dir):
    sd = random_upstream_state_dict(1, CLIP_D)
    sd["visual.transformer.resblocks.1.mlp.c_proj.weight"] = torch.zeros(WIDTH, MLP + 1)
    sd["text.text_adaptor.2.weight"] = torch.zeros(24, H)  # adapter lands in 24-d, image tower in 16-d
    with pytest.raises(UnsupportedCheckpointError, match="wrong shapes") as err:
        _convert(tmp_path, sd, tiny_llm_dir, tiny_clip_dir)
    message = str(err.value)
    expected = f"visual.transformer.resblocks.1.mlp.c_proj.weight (expected ({WIDTH}, {MLP}), got ({WIDTH}, {MLP + 1}))"
    assert expected in message
    assert f"text.text_adaptor.2.weight (expected ({CLIP_D}, {H}), got (24, {H}))" in message


def test_unexpected_keys_are_refused_not_dropped(tmp_path, tiny_clip_dir, tiny_llm_dir):
    sd = random_upstream_state_dict(1, CLIP_D)
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)  # layer scale: CLIPVisionModel has none
    sd["text.token_embedding.weight"] = torch.zeros(10, H)
    with pytest.raises(UnsupportedCheckpointError, match="unexpected keys") as err:
        _convert(tmp_path, sd, tiny_llm_dir, tiny_clip_dir)
    assert "visual.transformer.resblocks.0.ls_1.gamma" in str(err.value)
    assert "text.token_embedding.weight" in str(err.value)


def test_eva_towers_are_refused_with_their_keys(tmp_path, tiny_clip_dir, tiny_llm_dir):
    sd = {k: v for k, v in random_upstream_state_dict(1, CLIP_D).items() if not k.startswith("visual.")}
    sd.update({
        "visual.patch_embed.proj.weight": torch.zeros(WIDTH, 3, PATCH, PATCH),
        "visual.blocks.0.attn.q_proj.weight": torch.zeros(WIDTH, WIDTH),
        "visual.rope.freqs_cos": torch.zeros(16, 8),
    })
    with pytest.raises(UnsupportedCheckpointError, match="EVA-CLIP") as err:
        _convert(tmp_path, sd, tiny_llm_dir, tiny_clip_dir)
    for key in ("visual.patch_embed.proj.weight", "visual.blocks.0.attn.q_proj.weight", "visual.rope.freqs_cos"):
        assert key in str(err.value)


def test_pickle_needing_more_than_weights_is_refused(tmp_path):
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"state_dict": random_upstream_state_dict(1, CLIP_D), "args": argparse.Namespace(lr=1e-5)}, checkpoint)
    with pytest.raises(UnsupportedCheckpointError, match="weights_only=True") as err:
        load_upstream_state_dict(checkpoint)
    assert "argparse.Namespace" in str(err.value)


def test_text_tower_of_another_size_is_refused(tmp_path, tiny_clip_dir, tiny_llm_dir):
    sd = random_upstream_state_dict(1, CLIP_D, hidden=48)
    with pytest.raises(UnsupportedCheckpointError, match="H=48.*hidden_size=32"):
        _convert(tmp_path, sd, tiny_llm_dir, tiny_clip_dir)


def test_vision_config_of_another_architecture_is_refused(tmp_path, tiny_clip_dir, tiny_llm_dir):
    sd = random_upstream_state_dict(1, CLIP_D, layers=3)
    with pytest.raises(UnsupportedCheckpointError, match=r"num_hidden_layers=2 \(checkpoint: 3\)"):
        _convert(tmp_path, sd, tiny_llm_dir, tiny_clip_dir)


def test_cli_reports_refusal_as_a_message(tmp_path, tiny_clip_dir, tiny_llm_dir, capsys):
    checkpoint = tmp_path / "upstream.safetensors"
    sd = random_upstream_state_dict(1, CLIP_D)
    del sd["logit_scale"]
    save_file(sd, checkpoint)
    with pytest.raises(SystemExit) as refused:
        cli_main(["convert", "--checkpoint", str(checkpoint), "--text", str(tiny_llm_dir), "--out",
                  str(tmp_path / "out"), "--vision-config", str(tiny_clip_dir)])
    assert refused.value.code == 2
    assert re.search("proclip convert: error: .*missing keys: logit_scale", capsys.readouterr().err)

"""ProCLIPModel keeps transformers' model contract, for each kind of text tower it accepts.

Modelled on how transformers tests `CLIPModel` (a `ModelTester` of tiny configs and inputs, the common checks run on
it), written for this project: save/load, init of every weight (missing ones included), eager vs sdpa on either
padding side, gradient checkpointing with a trainable text tower, batching, fp16/bf16 loading, hidden states and
attentions, `return_dict=False`, resizing the token embeddings, meta-device init and `device_map="auto"` with CPU
and disk offload. The three towers: a causal Llama (last-token pooling), a bidirectional Llama with mean pooling
(the LLM2CLIP setting) and a BERT encoder with CLS pooling.
"""

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, CLIPModel

from configuration_proclip import ProCLIPConfig
from modeling_proclip import ProCLIPAdapter, ProCLIPModel

VOCAB, PAD = 99, 0
LLAMA = dict(
    model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1,
    eos_token_id=2,
)
BERT = dict(
    model_type="bert", vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6,
    projection_dim=16,
)
TOWERS = {
    "causal_llama": dict(text_config=LLAMA, pooling="last_token"),
    "bidirectional_llama": dict(text_config=LLAMA, pooling="mean", bidirectional=True),
    "bert_cls": dict(text_config=BERT, pooling="cls"),
}
LENGTHS = (7, 4, 1)  # real tokens of each caption of the test batch


@dataclass
class ProCLIPModelTester:
    """Tiny configs and inputs for one kind of text tower, and the folder of a seeded model saved from them."""

    kind: str
    folder: Path
    config: ProCLIPConfig = field(init=False)

    def __post_init__(self):
        self.config = self.make_config()
        torch.manual_seed(0)
        ProCLIPModel(self.config).save_pretrained(self.folder)

    def make_config(self, **overrides) -> ProCLIPConfig:
        return ProCLIPConfig(vision_config=VISION, adapter_blocks=2, adapter_expansion=2, **TOWERS[self.kind],
                             **overrides)

    def load(self, **kwargs) -> ProCLIPModel:
        return ProCLIPModel.from_pretrained(self.folder, **kwargs).eval()

    @staticmethod
    def captions(padding_side: str = "right") -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` `(3, 7)`: captions of `LENGTHS` real tokens, padded on `padding_side`."""
        generator = torch.Generator().manual_seed(1)
        rows = [torch.randint(3, VOCAB, (length,), generator=generator) for length in LENGTHS]
        longest = max(LENGTHS)
        input_ids = torch.full((len(rows), longest), PAD)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for row, ids in enumerate(rows):
            span = slice(0, len(ids)) if padding_side == "right" else slice(longest - len(ids), longest)
            input_ids[row, span], attention_mask[row, span] = ids, 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @staticmethod
    def pixel_values(batch_size: int = 3) -> torch.Tensor:
        """`(batch_size, 3, 30, 30)` random images."""
        return torch.randn(batch_size, 3, VISION["image_size"], VISION["image_size"],
                           generator=torch.Generator().manual_seed(2))

    def inputs(self, padding_side: str = "right") -> dict[str, torch.Tensor]:
        return {**self.captions(padding_side), "pixel_values": self.pixel_values()}


@pytest.fixture(scope="module", params=list(TOWERS))
def tester(request, tmp_path_factory) -> ProCLIPModelTester:
    return ProCLIPModelTester(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module", autouse=True)
def one_thread_here(one_thread):
    """Tiny matrices on shared cores run fastest on one thread."""


def embeddings(model: ProCLIPModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        output = model(**inputs)
    return output.text_embeds, output.image_embeds


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def save_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def copy_of(folder: Path, to: Path, keep=lambda key: True, extra: dict | None = None) -> Path:
    """`folder`'s config and code in `to`, with the weights `keep` selects, plus `extra` ones."""
    to.mkdir()
    for path in folder.iterdir():
        if path.suffix in (".json", ".py"):
            (to / path.name).write_bytes(path.read_bytes())
    save_weights(to, {**{k: v for k, v in saved_weights(folder).items() if keep(k)}, **(extra or {})})
    return to


def clip_attention_std(config: ProCLIPConfig) -> float:
    """The std `CLIPPreTrainedModel._init_weights` gives q/k/v projections."""
    vision = config.vision_config
    return vision.hidden_size**-0.5 * (2 * vision.num_hidden_layers) ** -0.5 * vision.initializer_factor


def assert_documented_adapter_init(adapter: ProCLIPAdapter) -> None:
    for module in adapter.modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
            assert module.weight.std().item() == pytest.approx(module.in_features**-0.5, rel=0.25)
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


# -- save / load -------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tester, tmp_path):
    model = tester.load()
    model.save_pretrained(tmp_path)
    loaded, info = ProCLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.config.to_dict() == {**model.config.to_dict(), "_name_or_path": str(tmp_path)}
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    for ours, theirs in zip(embeddings(model, tester.inputs()), embeddings(loaded.eval(), tester.inputs())):
        assert torch.equal(ours, theirs)


# -- init --------------------------------------------------------------------------------------------------------------


def test_a_model_built_from_its_config_has_the_documented_init(tester):
    torch.manual_seed(3)
    model = ProCLIPModel(tester.config)
    assert_documented_adapter_init(model.text_adapter)
    assert model.visual_projection.weight.std().item() == pytest.approx(32**-0.5, rel=0.25)
    assert model.logit_scale.item() == pytest.approx(tester.config.logit_scale_init)
    q_proj = model.vision_model.encoder.layers[0].self_attn.q_proj
    assert q_proj.weight.std().item() == pytest.approx(clip_attention_std(tester.config), rel=0.25)


def test_from_towers_keeps_the_towers_weights_and_initialises_the_adapter(tiny_clip_dir, tiny_llm_dir):
    torch.manual_seed(3)
    model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=tiny_llm_dir, adapter_expansion=2)
    assert_documented_adapter_init(model.text_adapter)
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    llm = AutoModel.from_pretrained(tiny_llm_dir)
    for ours, theirs in ((model.vision_model.state_dict(), clip.vision_model.state_dict()),
                         (model.text_model.state_dict(), llm.state_dict()),
                         (model.visual_projection.state_dict(), clip.visual_projection.state_dict())):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_folder_without_adapter_weights_gets_the_documented_init_and_a_warning(tester, tmp_path, caplog):
    folder = copy_of(tester.folder, tmp_path / "no_adapter", keep=lambda key: not key.startswith("text_adapter."))
    expected = ProCLIPAdapter(tester.config)
    torch.manual_seed(4)
    expected.reset_parameters()
    torch.manual_seed(4)
    with caplog.at_level(logging.WARNING):
        model = ProCLIPModel.from_pretrained(folder)
    assert "no trained weights for text_adapter" in caplog.text
    for (name, ours), (_, theirs) in zip(model.text_adapter.state_dict().items(), expected.state_dict().items(),
                                         strict=True):
        assert torch.equal(ours, theirs), name
    text, image = embeddings(model.eval(), tester.inputs())
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


def test_a_resized_adapter_is_initialised_not_left_as_memory(tester, caplog):
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING):
        model = tester.load(adapter_expansion=3, ignore_mismatched_sizes=True)
    assert "no trained weights for text_adapter" in caplog.text
    fc1 = model.text_adapter.blocks[0].fc1
    assert fc1.out_features == 3 * 32 and torch.equal(fc1.bias, torch.zeros_like(fc1.bias))
    assert fc1.weight.std().item() == pytest.approx(32**-0.5, rel=0.25)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_missing_vision_weights_get_clip_s_own_init(tester, tmp_path):
    """The image tower is initialised by CLIP's `_init_weights` however the model is built: not transformers' generic
    std 0.02 (what the custom-code shortcut left for modules without parameters of their own)."""
    layer = "vision_model.encoder.layers.0."
    folder = copy_of(tester.folder, tmp_path / "no_layer", keep=lambda key: not key.startswith(layer))
    model = ProCLIPModel.from_pretrained(folder)
    q_proj = model.vision_model.encoder.layers[0].self_attn.q_proj
    assert q_proj.weight.std().item() == pytest.approx(clip_attention_std(tester.config), rel=0.25)


def test_meta_device_init(tester):
    """Built on the meta device (no memory), then materialised: `init_weights` sets every weight and buffer."""
    with torch.device("meta"):
        model = ProCLIPModel(tester.config)
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    reference = ProCLIPModel(tester.config)
    for (name, ours), (_, theirs) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(ours, theirs), name
    assert_documented_adapter_init(model.text_adapter)
    text, image = embeddings(model.eval(), tester.inputs())
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


# -- attention and batching --------------------------------------------------------------------------------------------


def test_eager_and_sdpa_agree_on_either_padding_side(tester):
    eager, sdpa = tester.load(attn_implementation="eager"), tester.load(attn_implementation="sdpa")
    assert eager.text_model.config._attn_implementation == "eager"
    assert sdpa.text_model.config._attn_implementation == "sdpa"
    reference = embeddings(eager, tester.inputs("right"))
    for model in (eager, sdpa):
        for side in ("right", "left"):
            for ours, theirs in zip(embeddings(model, tester.inputs(side)), reference):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_batching_equivalence(tester):
    """A caption or image embeds the same alone as inside a padded batch."""
    model, inputs = tester.load(), tester.inputs()
    text, image = embeddings(model, inputs)
    for row, length in enumerate(LENGTHS):
        alone = {"input_ids": inputs["input_ids"][row : row + 1, :length],
                 "attention_mask": inputs["attention_mask"][row : row + 1, :length],
                 "pixel_values": inputs["pixel_values"][row : row + 1]}
        text_alone, image_alone = embeddings(model, alone)
        torch.testing.assert_close(text_alone[0], text[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(image_alone[0], image[row], atol=1e-5, rtol=1e-5)


# -- training ----------------------------------------------------------------------------------------------------------


def gradients(model: ProCLIPModel, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**inputs, return_loss=True).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_gradient_checkpointing_with_a_trainable_text_tower(tester):
    """Every parameter gets a gradient (an unused one, e.g. BERT's pooler, makes DDP without
    `find_unused_parameters` fail), and checkpointing both towers gives the same gradients."""
    model, inputs = tester.load().train(), tester.inputs("left")
    plain = gradients(model, inputs)
    assert [name for name, grad in plain.items() if grad is None] == []
    model.gradient_checkpointing_enable()
    assert model.text_model.is_gradient_checkpointing and model.vision_model.is_gradient_checkpointing
    checkpointed = gradients(model, inputs)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_bert_tower_is_built_without_its_pooler_and_old_checkpoints_still_load(tmp_path):
    bert = ProCLIPModelTester("bert_cls", tmp_path / "bert")
    model = bert.load()
    assert model.text_model.pooler is None
    assert not any("pooler" in name for name, _ in model.named_parameters())
    old_pooler = {"text_model.pooler.dense.weight": torch.zeros(32, 32),
                  "text_model.pooler.dense.bias": torch.zeros(32)}
    old = copy_of(bert.folder, tmp_path / "old", extra=old_pooler)
    loaded, info = ProCLIPModel.from_pretrained(old, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    for ours, theirs in zip(embeddings(model, bert.inputs()), embeddings(loaded.eval(), bert.inputs())):
        assert torch.equal(ours, theirs)


# -- dtypes, device maps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(tester, dtype):
    model = tester.load(dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = {**tester.inputs(), "pixel_values": tester.pixel_values().to(dtype)}
    for half, full in zip(embeddings(model, inputs), embeddings(tester.load(), tester.inputs())):
        assert half.dtype == dtype
        assert torch.nn.functional.cosine_similarity(half.float(), full).min() > 0.99


def test_device_map_auto_offloads_to_cpu_and_disk_without_splitting_a_layer(tester, tmp_path):
    full = tester.load()
    size = sum(p.numel() * p.element_size() for p in full.parameters())
    model = tester.load(device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(tmp_path))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    layer_class = {"llama": "LlamaDecoderLayer", "bert": "BertLayer"}[tester.config.text_config.model_type]
    assert {layer_class, "CLIPEncoderLayer", "ProCLIPAdapterBlock"} <= set(model._no_split_modules)
    for name in model.hf_device_map:  # no placement names a part of a module that must stay whole
        parents = name.split(".")[:-1]
        for depth in range(1, len(parents) + 1):
            parent = model.get_submodule(".".join(parents[:depth]))
            assert type(parent).__name__ not in model._no_split_modules, name
    for ours, theirs in zip(embeddings(model, tester.inputs()), embeddings(full, tester.inputs())):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


# -- outputs -----------------------------------------------------------------------------------------------------------


def test_hidden_states_and_attentions(tester):
    model = tester.load(attn_implementation="eager")
    inputs = tester.inputs()
    batch, length = inputs["input_ids"].shape
    text_config, vision_config = tester.config.text_config, tester.config.vision_config
    options = {"output_hidden_states": True, "output_attentions": True}
    with torch.inference_mode():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], **options)
        image = model.get_image_features(inputs["pixel_values"], **options)
        both = model(**inputs, **options)
    patches = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    for output, tokens, config in ((text, length, text_config), (image, patches, vision_config)):
        assert len(output.hidden_states) == config.num_hidden_layers + 1
        assert {h.shape for h in output.hidden_states} == {(batch, tokens, config.hidden_size)}
        assert len(output.attentions) == config.num_hidden_layers
        assert {a.shape for a in output.attentions} == {(batch, config.num_attention_heads, tokens, tokens)}
    for ours, theirs in ((both.text_model_output, text), (both.vision_model_output, image)):
        assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True))
    assert model(**inputs).text_model_output.hidden_states is None


def test_return_dict_false_everywhere(tester):
    model, inputs = tester.load(), tester.inputs()
    captions = (inputs["input_ids"], inputs["attention_mask"])
    with torch.inference_mode():
        as_object = model(**inputs, return_loss=True)
        text = model.get_text_features(*captions, return_dict=False)
        image = model.get_image_features(inputs["pixel_values"], return_dict=False)
        as_tuple = model(**inputs, return_loss=True, return_dict=False)
        model.config.return_dict = False
        from_config = (model(**inputs), model.get_text_features(*captions),
                       model.get_image_features(inputs["pixel_values"]))
    assert all(isinstance(output, tuple) for output in (text, image, as_tuple, *from_config))
    assert torch.equal(text[1], as_object.text_model_output.pooler_output)
    assert torch.equal(image[1], as_object.vision_model_output.pooler_output)
    assert torch.equal(as_tuple[0], as_object.loss) and torch.equal(as_tuple[1], as_object.logits_per_image)
    assert torch.equal(from_config[0][0], as_object.logits_per_image)
    assert torch.equal(as_tuple[5][1], text[1]) and torch.equal(as_tuple[6][1], image[1])


# -- token embeddings --------------------------------------------------------------------------------------------------


def test_resized_token_embeddings_work_and_survive_save_load(tester, tmp_path):
    model = tester.load()
    assert model.get_input_embeddings() is model.text_model.get_input_embeddings()
    torch.manual_seed(6)
    model.resize_token_embeddings(VOCAB + 5)
    assert model.get_input_embeddings().num_embeddings == VOCAB + 5 == model.config.text_config.vocab_size
    assert model.vocab_size == VOCAB + 5  # as PreTrainedModel.resize_token_embeddings records it
    inputs = tester.inputs()
    inputs["input_ids"][0, 0] = VOCAB + 4  # a new token
    before = embeddings(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = ProCLIPModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    for ours, theirs in zip(embeddings(loaded, inputs), before):
        assert torch.equal(ours, theirs)


# -- processor ------------------------------------------------------------------------------------------------------


def test_the_processor_takes_images_as_processor_mixin_subclasses_do(processor):
    """Annotated like `ProcessorMixin.__call__`, so transformers' processor checks send it nested images (one list
    per caption, possibly empty): they are processed as the flat list, grayscale arrays included."""
    parameters = inspect.signature(type(processor).__call__).parameters
    assert {"images", "text"} <= {name for name, p in parameters.items() if p.annotation is not p.empty}
    images = [Image.new("RGB", (40, 36), (200, 30, 30)), np.full((20, 24), 90, dtype=np.uint8)]
    flat = processor(images=images, text=["a red circle", "a dog"])
    nested = processor(images=[[images[0]], [images[1]]], text=["a red circle", "a dog"])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    assert torch.equal(nested["input_ids"], flat["input_ids"])
    partly = processor(images=[[], [images[1]]], text=["a red circle", "a dog"])
    assert torch.equal(partly["pixel_values"], flat["pixel_values"][1:])

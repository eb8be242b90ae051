"""Stage 0 (LLM2CLIP caption-contrastive fine-tuning) and caption retrieval accuracy (CRA) on tiny towers.

What is checked:
- the CRA runner equals a hand computation (one caption at a time, no padding, plain cosine argmax), with causal and
  bidirectional attention; ProCLIP and CLIP folders are embedded the way their own models embed text;
- the caption-pair collator draws two different captions per row and counts rows without two; the MNTP masking and
  loss match their definitions (position i - 1 predicts masked token i);
- stage 0 on a random tiny Llama raises held-out CRA far above the raw model's, trains LoRA parameters only (every
  base weight is bit-identical to the raw folder's before the merge), runs bidirectional attention while training,
  and exports a plain folder whose embeddings equal the unmerged model's; `from_towers` picks up its pooling and
  bidirectional attention from `proclip_text_tower.json` without flags;
- with MNTP, both phases train only LoRA, and a folder without an LM head is refused;
- `proclip train --stage 0` (flags and --config) and `proclip eval --task caption-retrieval` work end to end.
"""

import itertools
import json
import random

import proclip_train.training.stage0 as stage0
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llm_tokenizer
from proclip_train.cli import main
from proclip_train.evaluation.tasks import text_tower_caption_retrieval_accuracy
from proclip_train.evaluation.text_towers import TextTower, load_text_tower
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.collators import CaptionPairCollator, mask_for_mntp
from proclip_train.training.stage0 import run_stage0
from proclip_train.training.stages import CaptionContrastiveStage, MaskedNextTokenStage
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

import modeling_proclip.modeling_proclip as modeling
from configuration_proclip import text_tower_preset
from modeling_proclip import (
    ProCLIPModel,
    ProCLIPProcessor,
    configure_text_tokenizer,
    embed_token_ids,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange")
SHAPES = ("circle", "square", "star", "triangle", "cross", "heart")
# Words that say nothing about the image: a raw model's mean-pooled states are dominated by them.
FILLER = tuple("today maybe very quite really just also still often perhaps here there again nearly simply".split())
TRAINING = dict(
    per_device_train_batch_size=32, learning_rate=2e-3, warmup_steps=0, save_strategy="no", logging_steps=20,
    use_cpu=True, disable_tqdm=True, seed=0,
)


def caption_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Two paraphrases per image that share only its colour and shape, wrapped in random filler words.
    n <= 48 gives every colour x shape once; more cycles through them."""
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES))
    pairs = []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        f = [rng.choice(FILLER) for _ in range(6)]
        pairs.append((f"{f[0]} {f[1]} a {colour} {shape} {f[2]}", f"{f[3]} the {shape} is {colour} {f[4]} {f[5]}"))
    return pairs


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"caption_a": a, "caption_b": b}) + "\n" for a, b in pairs))
    return path


HELD_OUT = caption_pairs(48, seed=1)  # new filler draws: nothing here was seen in training


def build_tiny_causal_lm(out_dir):
    """A random 2-layer LlamaForCausalLM (tied LM head) with the tiny LLM tokenizer: MNTP needs an LM head."""
    torch.manual_seed(0)
    tokenizer = tiny_llm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# -- CRA of any text tower --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cra_runner_equals_hand_computation(tiny_llm_dir, bidirectional):
    pairs = HELD_OUT[:16]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModel.from_pretrained(tiny_llm_dir).eval()

    @torch.no_grad()
    def by_hand(caption):  # alone, unpadded: mean of the last hidden states
        ids = tokenizer(caption, return_tensors="pt")["input_ids"]
        length = ids.shape[1]
        mask = torch.zeros(1, 1, length, length) if bidirectional else torch.ones(1, length, dtype=torch.long)
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[0].mean(0)

    first = F.normalize(torch.stack([by_hand(a) for a, _ in pairs]), dim=-1)
    second = F.normalize(torch.stack([by_hand(b) for _, b in pairs]), dim=-1)
    similarity = first @ second.T
    hits = [bool((similarity[i, i] > torch.cat([similarity[i, :i], similarity[i, i + 1 :]])).all()) for i in range(16)]

    cra = text_tower_caption_retrieval_accuracy(
        tiny_llm_dir, [a for a, _ in pairs], [b for _, b in pairs], batch_size=5, bidirectional=bidirectional, device="cpu"
    )
    assert cra == pytest.approx(sum(hits) / 16)


def test_proclip_and_clip_towers_embed_as_their_models(tiny_proclip_dir, tiny_clip_dir):
    texts = ["a red circle", "two blue squares on the left", "a star"]
    proclip = load_text_tower(tiny_proclip_dir, device="cpu")
    model, processor = ProCLIPModel.from_pretrained(tiny_proclip_dir), ProCLIPProcessor.from_pretrained(tiny_proclip_dir)
    with torch.no_grad():
        expected = model.get_text_features(**processor(text=texts)).pooler_output
    assert proclip.kind == "proclip"
    torch.testing.assert_close(proclip.embed(texts, batch_size=2), expected, atol=1e-5, rtol=1e-5)

    clip = load_text_tower(tiny_clip_dir, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    with torch.no_grad():  # CLIP's own text features
        expected = CLIPModel.from_pretrained(tiny_clip_dir).get_text_features(
            **tokenizer(texts, padding=True, return_tensors="pt")
        ).pooler_output
    assert clip.kind == "clip"
    torch.testing.assert_close(clip.embed(texts, batch_size=2), expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="apply to LLMs"):
        load_text_tower(tiny_clip_dir, pooling="cls")


# -- batches ------------------------------------------------------------------------------------------------------------


def test_caption_pair_collator_draws_two_different_captions_and_counts_rows_without_two(tiny_llm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [
        {"a": "a red circle", "b": ["the circle is red"]},
        {"a": "a dog", "b": ["a dog", " "]},  # one distinct caption
        {"a": "", "b": []},
        {"a": "x", "b": ["y", "z"]},
    ]
    collator = CaptionPairCollator(tokenizer, ["a", "b"], seed=0)
    batch = collator(rows)
    assert batch["skipped"]["too_few_captions"] == 2
    assert (batch["captions"][0], batch["pair_captions"][0]) == ("a red circle", "the circle is red")  # column order
    assert (batch["captions"][1], batch["pair_captions"][1]) in {("x", "y"), ("x", "z"), ("y", "z")}
    expected = tokenizer(batch["pair_captions"], padding=True, return_tensors="pt")
    assert torch.equal(batch["pair_input_ids"], expected["input_ids"])
    assert torch.equal(batch["pair_attention_mask"], expected["attention_mask"])


def test_mntp_masking():
    input_ids = torch.arange(100, 124).reshape(3, 8)
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8, [0, 0, 0, 0, 0, 0, 1, 1]])
    generator = torch.Generator().manual_seed(0)
    masked, labels = mask_for_mntp(input_ids, attention_mask, mask_token_id=7, probability=0.3, generator=generator)
    chosen = labels != -100
    first_real = attention_mask.argmax(-1)
    assert not chosen[attention_mask == 0].any()  # padding never
    assert not chosen[torch.arange(3), first_real].any()  # nothing before the first token to predict it from
    assert chosen.sum(-1).min() >= 1  # every row learns something
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert (masked[chosen] == 7).all() and torch.equal(masked[~chosen], input_ids[~chosen])
    _, only_forced = mask_for_mntp(input_ids, attention_mask, 7, probability=0.0)
    assert ((only_forced != -100).sum(-1) == 1).all()


def test_mntp_loss_predicts_each_masked_token_from_the_previous_position(tmp_path):
    causal = build_tiny_causal_lm(tmp_path / "causal")
    lm = LlamaForCausalLM.from_pretrained(causal).eval()
    stage = MaskedNextTokenStage(
        ProCLIPTrainingArguments(output_dir=str(tmp_path / "out"), stage="masked-next-token", text=str(causal))
    )
    stage.setup(lm, torch.device("cpu"), AutoTokenizer.from_pretrained(causal))
    assert stage.settings.bidirectional  # stage 0's default: LLM2Vec's bidirectional attention
    input_ids = torch.randint(100, lm.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[0, 5], labels[1, 1] = input_ids[0, 2], input_ids[0, 5], input_ids[1, 1]
    masked = torch.where(labels != -100, 7, input_ids)
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        batch = {"captions": ["", ""], "input_ids": masked, "attention_mask": attention_mask, "labels": labels}
        loss = stage.compute(lm, batch)["loss"]
        logits = lm(input_ids=masked, attention_mask=torch.zeros(2, 1, 6, 6)).logits  # no causal mask
    targets = [(0, 2), (0, 5), (1, 1)]
    by_hand = torch.stack([F.cross_entropy(logits[r, i - 1], input_ids[r, i]) for r, i in targets]).mean()
    torch.testing.assert_close(loss, by_hand)


# -- stage 0 end to end ------------------------------------------------------------------------------------------------


def lora_free_name(name: str) -> str:
    """A peft parameter's name in the plain model: `base_model.model.X.base_layer.weight` -> `X.weight`."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.fixture(scope="module")
def stage0_run(tmp_path_factory, tiny_llm_dir):
    """One stage-0 run on the tiny Llama, with what it did recorded just before the LoRA merge."""
    tmp = tmp_path_factory.mktemp("stage0")
    record = {"bidirectional_masks": 0}
    real_export, real_mask = stage0.export_text_tower, modeling.bidirectional_attention_mask

    def counting_mask(attention_mask, dtype):
        record["bidirectional_masks"] += 1
        return real_mask(attention_mask, dtype)

    def spying_export(model, tokenizer, settings, out_dir):
        record["masks_while_training"] = record["bidirectional_masks"]
        record["parameters"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        record["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        run_tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
        configure_text_tokenizer(run_tokenizer, settings)
        model.eval()

        def unmerged(input_ids, attention_mask):
            return embed_token_ids(model, input_ids, attention_mask, settings).pooler_output

        tower = TextTower("llm", "unmerged", run_tokenizer, unmerged, {}, torch.device("cpu"))
        record["unmerged_held_out"] = tower.embed([a for a, _ in HELD_OUT])
        return real_export(model, tokenizer, settings, out_dir)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage0, "export_text_tower", spying_export)
        patch.setattr(modeling, "bidirectional_attention_mask", counting_mask)
        data = write_pairs(tmp / "pairs.jsonl", caption_pairs(512, seed=0))
        out = run_stage0(tiny_llm_dir, data, ["caption_a", "caption_b"], tmp / "out", lora_r=8, max_steps=60,
                         **TRAINING)
    record["out"] = out
    return record


def test_stage0_raises_held_out_cra_over_the_raw_model(stage0_run, tiny_llm_dir):
    first, second = [a for a, _ in HELD_OUT], [b for _, b in HELD_OUT]
    raw = text_tower_caption_retrieval_accuracy(tiny_llm_dir, first, second, device="cpu")  # as from_towers would run it
    raw_bidirectional = text_tower_caption_retrieval_accuracy(tiny_llm_dir, first, second, device="cpu", bidirectional=True)
    tuned = text_tower_caption_retrieval_accuracy(stage0_run["out"], first, second, device="cpu")
    assert tuned >= 0.7
    assert tuned >= max(raw, raw_bidirectional) + 0.4


def test_stage0_trains_only_lora(stage0_run, tiny_llm_dir):
    raw = AutoModel.from_pretrained(tiny_llm_dir).state_dict()
    parameters = stage0_run["parameters"]
    lora = {n for n in parameters if ".lora_" in n}
    assert lora and stage0_run["trainable"] == lora
    for name, value in parameters.items():
        if name not in lora:
            assert torch.equal(value, raw[lora_free_name(name)]), name
    lora_b = [name for name in lora if ".lora_B." in name]  # initialised to zero by peft
    assert lora_b and all(parameters[name].abs().sum() > 0 for name in lora_b)


def test_merged_export_embeds_like_the_unmerged_model(stage0_run):
    out = stage0_run["out"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "proclip_text_tower.json", "stage0_report.json"} <= {
        path.name for path in out.iterdir()
    }
    assert not any("lora" in name for name in AutoModel.from_pretrained(out).state_dict())
    exported = load_text_tower(out, device="cpu").embed([a for a, _ in HELD_OUT])
    torch.testing.assert_close(exported, stage0_run["unmerged_held_out"], atol=1e-5, rtol=1e-4)
    report = json.loads((out / "stage0_report.json").read_text())
    assert report["contrastive"]["steps"] == 60 and report["contrastive"]["seconds"] > 0 and "mntp" not in report


def test_bidirectional_attention_trains_and_is_recorded_for_from_towers(stage0_run, tiny_clip_dir):
    assert stage0_run["masks_while_training"] >= 2 * 60  # both caption views of every step
    out = stage0_run["out"]
    assert text_tower_preset(out) == {"pooling": "mean", "bidirectional": True, "prompt_template": None,
                                      "padding_side": None}
    model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=out, adapter_expansion=1)  # no text flags
    assert (model.config.pooling, model.config.bidirectional) == ("mean", True)
    processor = ProCLIPProcessor.from_towers(tiny_clip_dir, out, model.config)
    with torch.no_grad():
        llm = model.get_llm_embeddings(**processor(text=[a for a, _ in HELD_OUT]))
    torch.testing.assert_close(llm, stage0_run["unmerged_held_out"], atol=1e-5, rtol=1e-4)


def test_mntp_then_contrastive_trains_only_lora_and_needs_an_lm_head(tmp_path, tiny_llm_dir, monkeypatch):
    trainable = []
    real_attach_lora = stage0.attach_lora

    def recording_attach_lora(model, args):
        wrapped = real_attach_lora(model, args)
        trainable.append({n for n, p in wrapped.named_parameters() if p.requires_grad})
        return wrapped

    monkeypatch.setattr(stage0, "attach_lora", recording_attach_lora)
    data = write_pairs(tmp_path / "pairs.jsonl", caption_pairs(64, seed=0))
    causal = build_tiny_causal_lm(tmp_path / "causal")
    out = run_stage0(causal, data, ["caption_a", "caption_b"], tmp_path / "out",
                     lora_r=4, mntp_steps=3, max_steps=2, **{**TRAINING, "per_device_train_batch_size": 8})
    assert len(trainable) == 2  # the MNTP LoRA (merged), then the contrastive one
    assert all(names and all(".lora_" in n for n in names) for names in trainable)
    assert not any("lm_head" in n for n in trainable[0])  # all-linear leaves the output layer alone
    report = json.loads((out / "stage0_report.json").read_text())
    assert report["mntp"]["steps"] == 3 and report["contrastive"]["steps"] == 2
    assert AutoModel.from_pretrained(out).config.architectures == ["LlamaModel"]

    with pytest.raises(ValueError, match="no trained LM head"):
        run_stage0(tiny_llm_dir, data, ["caption_a", "caption_b"], tmp_path / "refused", mntp_steps=1, max_steps=1,
                   **TRAINING)


# -- command line ------------------------------------------------------------------------------------------------------


def test_train_stage0_and_eval_caption_retrieval_commands(tmp_path, tiny_llm_dir):
    data = write_pairs(tmp_path / "pairs.jsonl", caption_pairs(64, seed=0))
    held_out = write_pairs(tmp_path / "held_out.jsonl", HELD_OUT)
    config = tmp_path / "stage0.yaml"
    config.write_text("stage: 0\nlora_r: 4\ncaption_column: [caption_a, caption_b]\nmax_steps: 2\n")
    out = tmp_path / "tuned"
    main(["train", "--config", str(config), "--text", str(tiny_llm_dir), "--data", str(data), "--out", str(out),
          "--per_device_train_batch_size", "8", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no"])
    report = json.loads((out / "stage0_report.json").read_text())
    assert report["options"]["lora_r"] == 4 and report["contrastive"]["steps"] == 2
    assert report["caption_columns"] == ["caption_a", "caption_b"]

    for tower in (tiny_llm_dir, out):
        results_file = tmp_path / f"cra_{tower.name}.json"
        main(["eval", "--task", "caption-retrieval", "--model", str(tower), "--data", str(held_out),
              "--caption-column", "caption_a", "--caption-column", "caption_b", "--out", str(results_file),
              "--device", "cpu"])
        results = json.loads(results_file.read_text())
        expected = text_tower_caption_retrieval_accuracy(tower, [a for a, _ in HELD_OUT], [b for _, b in HELD_OUT], device="cpu")
        assert results["metrics"] == {"num_images": 48, "caption_retrieval_accuracy": expected}
        assert results["protocol"]["text_tower"]["bidirectional"] is (tower == out)
        assert results["data"]["skipped_rows"] == {"too_few_captions": 0}


def test_activation_checkpointing_trains_the_same_weights(tmp_path, tiny_llm_dir, monkeypatch):
    data = write_pairs(tmp_path / "pairs.jsonl", caption_pairs(64, seed=0))
    checkpointed = []
    real_enable = PreTrainedModel.activation_checkpointing_enable

    def recording_enable(self, *args, **kwargs):
        real_enable(self, *args, **kwargs)
        checkpointed.append((self.is_activation_checkpointing, kwargs.get("activation_checkpointing_kwargs")))

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", recording_enable)
    weights = []
    for checkpointing in (False, True):
        out = run_stage0(tiny_llm_dir, data, ["caption_a", "caption_b"], tmp_path / str(checkpointing),
                         lora_r=4, max_steps=3, activation_checkpointing=checkpointing,
                         **{**TRAINING, "per_device_train_batch_size": 8})
        weights.append(AutoModel.from_pretrained(out).state_dict())
    assert checkpointed == [(True, {"use_reentrant": False})]  # the run with the flag, only; non-reentrant
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(weights[0]["layers.0.self_attn.q_proj.weight"],
                           AutoModel.from_pretrained(tiny_llm_dir).state_dict()["layers.0.self_attn.q_proj.weight"])


def test_one_text_path_from_stage0_to_eval_to_the_model(stage0_run, tiny_clip_dir, tmp_path):
    """The same caption gets the same vector from the stage-0 stage's embedder, from the text tower
    `proclip eval --task caption-retrieval` loads, and from `ProCLIPModel.get_llm_embeddings` (through the processor, and
    from untruncated ids cut by the model), for a caption longer than max_text_length too."""
    out, max_length = stage0_run["out"], 16
    captions = [HELD_OUT[0][0], " ".join(a for a, _ in HELD_OUT[:12])]  # a short one, and one far over 16 tokens

    stage = CaptionContrastiveStage(ProCLIPTrainingArguments(
        output_dir=str(tmp_path / "unused"), stage=0, text=str(out), max_text_length=max_length,
        caption_column=["caption_a", "caption_b"],
    ))
    stage0_model = AutoModel.from_pretrained(out).eval()
    stage.setup(stage0_model, torch.device("cpu"), AutoTokenizer.from_pretrained(out))
    batch = stage.make_collator(stage.tokenizer, None)([{"caption_a": c, "caption_b": "another"} for c in captions])
    assert batch["attention_mask"].sum(-1).max() == max_length  # the long caption was truncated
    with torch.no_grad():
        by_stage0 = embed_token_ids(
            stage.text_model(stage0_model), batch["input_ids"], batch["attention_mask"], stage.settings
        ).pooler_output

    by_eval = load_text_tower(out, device="cpu", max_text_length=max_length).embed(captions)

    model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=out, adapter_expansion=1, max_text_length=max_length)
    processor = ProCLIPProcessor.from_towers(tiny_clip_dir, out, model.config)
    full = processor.tokenizer(captions, padding=True, truncation=False, return_tensors="pt")
    assert full["attention_mask"].sum(-1).max() > max_length
    with torch.no_grad():
        by_processor = model.get_llm_embeddings(**processor(text=captions))
        by_model_truncation = model.get_llm_embeddings(full["input_ids"], full["attention_mask"])

    for other in (by_eval, by_processor, by_model_truncation):
        torch.testing.assert_close(other, by_stage0, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(by_stage0[0], by_stage0[1])

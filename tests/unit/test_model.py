"""The Hub-native model: config, towers, pooling, adapter, processor, remote code, pipeline, handler."""

import base64
import http.server
import io
import json
import logging
import threading
import time

import numpy as np
import pytest
import torch
from conftest import (
    LLM_BOS,
    LLM_EOS,
    build_tiny_llm,
    minilm_folder,
    red_image,
    tiny_llm_tokenizer,
)
from transformers import AutoModel, AutoTokenizer, CLIPModel, pipeline

from configuration_proclip import ProCLIPConfig, text_tower_preset
from modeling_proclip import (
    ImagePolicy,
    ProCLIPAdapter,
    ProCLIPModel,
    ProCLIPProcessor,
    pool_hidden_states,
    truncate_text_inputs,
)

CAPTIONS = ["a red circle", "two blue squares on the left of a small green triangle", "a dog"]


# -- config ---------------------------------------------------------------------------------------------------------


def test_config_refuses_bad_values_by_name():
    with pytest.raises(ValueError) as error:
        ProCLIPConfig(pooling="max", adapter_blocks=0, prompt_template="no placeholder", padding_side="up")
    for name in ("pooling='max'", "adapter_blocks=0", "prompt_template=", "padding_side='up'"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="projection_dim=32 differs"):
        ProCLIPConfig(vision_config={"projection_dim": 16}, projection_dim=32)


def test_config_round_trips_text_config_with_its_own_model_type(tmp_path):
    config = ProCLIPConfig(text_config={"model_type": "bert", "hidden_size": 48}, vision_config={"projection_dim": 24})
    config.save_pretrained(tmp_path)
    loaded = ProCLIPConfig.from_pretrained(tmp_path)
    assert type(loaded.text_config).__name__ == "BertConfig"
    assert loaded.text_hidden_size == 48 and loaded.projection_dim == 24
    assert loaded.auto_map["AutoModel"] == "modeling_proclip.ProCLIPModel"


# -- adapter and pooling --------------------------------------------------------------------------------------------


def test_adapter_parameter_count_matches_the_paper_figure():
    config = ProCLIPConfig(
        text_config={"model_type": "llama", "hidden_size": 4096}, vision_config={"projection_dim": 768},
        adapter_blocks=1, adapter_expansion=8,
    )
    with torch.device("meta"):
        adapter = ProCLIPAdapter(config)
    h, d, r = 4096, 768, 8
    expected = 2 * h + (h * r * h + r * h) + (r * h * h + h) + 2 * h + (h * d + d)
    assert sum(p.numel() for p in adapter.parameters()) == expected == 271_635_200


def test_adapter_computes_the_method_formula():
    config = ProCLIPConfig(text_config={"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}, vision_config={"projection_dim": 4},
                           adapter_blocks=2, adapter_expansion=3)
    torch.manual_seed(0)
    adapter = ProCLIPAdapter(config)
    for p in adapter.parameters():
        torch.nn.init.normal_(p)
    e = torch.randn(5, 8)
    rows = []
    for row in e / e.norm(dim=-1, keepdim=True):
        for block in adapter.blocks:
            ln = (row - row.mean()) / torch.sqrt(row.var(unbiased=False) + 1e-5) * block.norm.weight + block.norm.bias
            hidden = torch.nn.functional.gelu(block.fc1.weight @ ln + block.fc1.bias)
            row = row + block.fc2.weight @ hidden + block.fc2.bias
        ln = (row - row.mean()) / torch.sqrt(row.var(unbiased=False) + 1e-5)
        rows.append(adapter.proj.weight @ (ln * adapter.final_norm.weight + adapter.final_norm.bias) + adapter.proj.bias)
    torch.testing.assert_close(adapter(e), torch.stack(rows), atol=1e-4, rtol=1e-4)


def test_pooling_by_hand_on_known_hidden_states():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.equal(pool_hidden_states(hidden, left, "mean"), torch.stack([hidden[0, 1:].mean(0), hidden[1, 2:].mean(0)]))
    assert torch.equal(pool_hidden_states(hidden, right, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)]))
    assert torch.equal(pool_hidden_states(hidden, left, "mean", skip_leading=1), torch.stack([hidden[0, 2:].mean(0), hidden[1, 3]]))
    assert torch.equal(pool_hidden_states(hidden, left, "last_token"), hidden[:, 3])
    assert torch.equal(pool_hidden_states(hidden, right, "last_token"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool_hidden_states(hidden, left, "cls"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(pool_hidden_states(hidden, right, "cls"), hidden[:, 0])


def test_truncation_keeps_the_suffix_for_either_padding_side():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    out_ids, out_mask = truncate_text_inputs(ids, mask, max_length=4, suffix_length=1)
    assert out_ids.tolist() == [[5, 6, 7, 9], [1, 2, 3, 6]] and out_mask.tolist() == [[1] * 4] * 2


# -- text tower: attention, one text path ---------------------------------------------------------------------------


def test_tiny_llm_tokenizer_is_deterministic_and_llm_like(tiny_llm_dir):
    """The tiny towers' tokenizer stands in for a real LLM's: same bytes each build, exact decoding, BOS/EOS around
    every text, right padding with EOS."""
    assert tiny_llm_tokenizer().backend_tokenizer.to_str() == tiny_llm_tokenizer().backend_tokenizer.to_str()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    text = "<|im_start|>user\nA Red circle,  twice<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens([ids[0], ids[-1]]) == [LLM_BOS, LLM_EOS]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("a red circle")["input_ids"]) == 2 + 3  # learnt words: one token each
    batch = tokenizer(["a dog", "a red circle"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    assert batch["attention_mask"][0] == [1, 1, 1, 1, 0]


def test_bidirectional_changes_a_decoder_and_causal_equals_the_plain_llm(tiny_clip_dir, tiny_llm_dir):
    causal = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=tiny_llm_dir, pooling="mean", adapter_expansion=1)
    bidirectional = ProCLIPModel.from_towers(
        vision=tiny_clip_dir, text=tiny_llm_dir, pooling="mean", bidirectional=True, adapter_expansion=1
    )
    plain = AutoModel.from_pretrained(tiny_llm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    batch = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = plain(**batch).last_hidden_state
        expected = pool_hidden_states(hidden, batch["attention_mask"], "mean")
        got_causal = causal.eval().get_llm_embeddings(batch["input_ids"], batch["attention_mask"])
        got_bidirectional = bidirectional.eval().get_llm_embeddings(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got_causal, expected, atol=1e-5, rtol=1e-5)
    assert (got_bidirectional - expected).abs().max() > 1e-2


def test_one_text_path_pipeline_tokenizer_processor_and_cached_embeddings_agree(model, processor):
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        by_processor = model.get_text_features(**processor(text=CAPTIONS)).pooler_output
        pipeline_style = tokenizer(CAPTIONS, return_tensors="pt", padding=True)  # what the pipeline calls
        by_pipeline = model.get_text_features(pipeline_style["input_ids"], pipeline_style["attention_mask"]).pooler_output
        pooled = model.get_llm_embeddings(pipeline_style["input_ids"], pipeline_style["attention_mask"])
        by_cache = model.get_text_features(llm_embeds=pooled.clone()).pooler_output
        other_side = "left" if tokenizer.padding_side == "right" else "right"
        tokenizer.padding_side = other_side
        try:
            switched = model.get_text_features(**processor(text=CAPTIONS)).pooler_output
        finally:
            tokenizer.padding_side = "left" if other_side == "right" else "right"
    torch.testing.assert_close(by_pipeline, by_processor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_cache, by_processor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(switched, by_processor, atol=1e-5, rtol=1e-5)


def test_text_features_name_their_contents_and_forward_can_return_a_tuple(model, processor):
    """`last_hidden_state` holds token states, never a pooled vector; `return_dict=False` gives CLIPModel's tuple."""
    batch = processor(text=CAPTIONS, images=[red_image()] * len(CAPTIONS))
    with torch.no_grad():
        features = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        llm = model.get_llm_embeddings(batch["input_ids"], batch["attention_mask"])
        from_cache = model.get_text_features(llm_embeds=llm)
        outputs = model(**batch, return_loss=True)
        as_tuple = model(**batch, return_loss=True, return_dict=False)
    seq_len = batch["input_ids"].shape[-1]
    assert features.last_hidden_state.shape == (len(CAPTIONS), seq_len, model.config.text_hidden_size)
    assert from_cache.last_hidden_state is None
    assert isinstance(as_tuple, tuple)
    loss, logits_per_image, logits_per_text, text_embeds, image_embeds = as_tuple[:5]
    torch.testing.assert_close(loss, outputs.loss)
    torch.testing.assert_close(logits_per_image, outputs.logits_per_image)
    torch.testing.assert_close(text_embeds, outputs.text_embeds)
    assert logits_per_text.shape == (len(CAPTIONS), len(CAPTIONS))
    assert image_embeds.shape == (len(CAPTIONS), model.config.projection_dim)


def test_long_text_is_truncated_alike_by_processor_and_model_with_one_warning(model, processor, caplog):
    long_caption = " ".join(["a very long caption about many red circles"] * 200)
    tokenizer = processor.tokenizer
    untruncated = tokenizer([long_caption], return_tensors="pt")
    assert untruncated["input_ids"].shape[-1] > model.config.max_text_length
    truncated = processor(text=[long_caption])
    assert truncated["input_ids"].shape[-1] == model.config.max_text_length
    logging.getLogger("transformers").propagate = True
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        from_model = model.get_text_features(untruncated["input_ids"], untruncated["attention_mask"]).pooler_output
        model.get_text_features(untruncated["input_ids"], untruncated["attention_mask"])
        from_processor = model.get_text_features(**truncated).pooler_output
    torch.testing.assert_close(from_model, from_processor, atol=1e-5, rtol=1e-5)
    assert sum("truncated" in r.getMessage() for r in caplog.records) <= 1


def test_prompt_template_and_instruction_live_in_the_saved_tokenizer(tmp_path, tiny_clip_dir, tiny_llm_dir):
    model = ProCLIPModel.from_towers(
        vision=tiny_clip_dir, text=tiny_llm_dir, prompt_template="<|im_start|>user\n{text}<|im_end|>",
        instruction="Retrieve the image: ", adapter_expansion=1,
    )
    processor = ProCLIPProcessor.from_towers(tiny_clip_dir, tiny_llm_dir, model.config)
    processor.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = reloaded("a red circle")["input_ids"]
    assert (ids[0], ids[-1]) == (reloaded.bos_token_id, reloaded.eos_token_id)  # the tokenizer's own BOS and EOS stay
    text = reloaded.decode(ids, skip_special_tokens=True)
    assert text == "<|im_start|>user\nRetrieve the image: a red circle<|im_end|>"
    prefix = len(reloaded("<|im_start|>user\nRetrieve the image: ", add_special_tokens=False)["input_ids"])
    assert model.config.instruction_length == 1 + prefix  # BOS, the template's head and the instruction
    suffix = len(reloaded("<|im_end|>", add_special_tokens=False)["input_ids"])
    assert model.config.text_suffix_length == suffix + 1  # the template's tail and EOS, kept by truncation


# -- vision parity, round trip --------------------------------------------------------------------------------------


def test_image_embeddings_equal_clip_on_the_same_weights(model, processor, tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = processor(images=[red_image(), red_image(size=(64, 48))])["pixel_values"]
    with torch.inference_mode():
        ours = model.get_image_features(pixels).pooler_output
        theirs = clip.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert model.logit_scale.item() == pytest.approx(clip.logit_scale.item())


def test_save_and_load_round_trip_gives_identical_outputs(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = ProCLIPModel.from_pretrained(tmp_path).eval()
    batch = ProCLIPProcessor.from_pretrained(tmp_path)(images=[red_image()], text=CAPTIONS)
    with torch.inference_mode():
        a, b = model(**batch), reloaded(**batch)
    assert torch.equal(a.logits_per_image, b.logits_per_image)
    assert torch.equal(a.text_embeds, b.text_embeds) and torch.equal(a.image_embeds, b.image_embeds)


def test_bf16_forward_stays_close_to_fp32(tiny_proclip_dir, processor):
    fp32 = ProCLIPModel.from_pretrained(tiny_proclip_dir).eval()
    bf16 = ProCLIPModel.from_pretrained(tiny_proclip_dir, dtype=torch.bfloat16).eval()
    batch = processor(images=[red_image()], text=CAPTIONS)
    with torch.inference_mode():
        a = fp32(**batch).text_embeds
        b = bf16(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"].to(torch.bfloat16)).text_embeds
    assert b.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(a, b.float()).min() > 0.99


def test_gradient_checkpointing_gives_the_same_gradients(tiny_proclip_dir, processor):
    batch = processor(images=[red_image(), red_image(size=(50, 50))], text=CAPTIONS[:2])
    grads = []
    for checkpointing in (False, True):
        model = ProCLIPModel.from_pretrained(tiny_proclip_dir).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**batch, return_loss=True).loss.backward()
        grads.append(model.text_adapter.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# -- remote code, pipeline, sentence-transformers, handler ----------------------------------------------------------


def test_sentence_transformers_default_equals_encode_text_and_encode_image(tiny_proclip_dir, model, processor):
    """`SentenceTransformer(folder).encode` with no options gives what `encode_text` / `encode_image` give: unit-length
    embeddings (the folder's modules.json ends in a `Normalize` module, as normalised sentence-transformers models do)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_proclip_dir), trust_remote_code=True, device="cpu")
    images = [red_image(), red_image("L", (50, 20))]
    text, image = torch.as_tensor(st.encode(CAPTIONS)), torch.as_tensor(st.encode(images))
    torch.testing.assert_close(text, model.encode_text(CAPTIONS, processor=processor), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(image, model.encode_image(images, processor=processor), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(CAPTIONS)))


# -- presets --------------------------------------------------------------------------------------------------------


@pytest.mark.real_weights
def test_sentence_transformers_folder_gets_its_own_pooling():
    folder = minilm_folder()
    assert text_tower_preset(folder)["pooling"] == "mean"
    cls_folder_config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert cls_folder_config["pooling_mode_mean_tokens"] is True


@pytest.mark.parametrize(
    "name, pooling, bidirectional, template_piece",
    [
        ("LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned", "mean", True, "<|start_header_id|>user"),
        ("Qwen3-Embedding-0.6B", "last_token", False, "<|endoftext|>"),
    ],
)
def test_known_embedder_presets_apply_without_flags(tmp_path, tiny_clip_dir, name, pooling, bidirectional, template_piece):
    stand_in = build_tiny_llm(tmp_path / name)
    model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=stand_in, adapter_expansion=1)
    assert (model.config.pooling, model.config.bidirectional) == (pooling, bidirectional)
    assert template_piece in model.config.prompt_template and model.config.padding_side == "left"
    overridden = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=stand_in, pooling="cls", adapter_expansion=1)
    assert overridden.config.pooling == "cls"
    processor = ProCLIPProcessor.from_towers(tiny_clip_dir, stand_in, model.config)
    assert template_piece in processor.tokenizer.decode(processor.tokenizer("a cat")["input_ids"])


# -- bad input ------------------------------------------------------------------------------------------------------


def test_adapter_and_llm_size_mismatch_is_refused(tmp_path, model, tiny_clip_dir):
    with pytest.raises(ValueError, match="llm_embeds have size 7 .* gives 32"):
        model.get_text_features(llm_embeds=torch.zeros(2, 7))
    wider = build_tiny_llm(tmp_path / "wider", hidden_size=48)
    other = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=wider, adapter_expansion=1)
    state = {k: v for k, v in other.state_dict().items() if k.startswith("text_adapter.")}
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(state, strict=False)


def test_tokenizer_without_pad_token_pads_with_eos_and_without_either_is_refused(tiny_clip_dir, tiny_llm_dir, model):
    from modeling_proclip import configure_text_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    tokenizer.pad_token = None
    configure_text_tokenizer(tokenizer, model.config)
    assert tokenizer.pad_token == tokenizer.eos_token
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        configure_text_tokenizer(tokenizer, model.config)


def test_grayscale_and_rgba_images_are_converted(processor, model):
    rgb = processor(images=[red_image("RGB")])["pixel_values"]
    for mode in ("L", "RGBA"):
        pixels = processor(images=[red_image(mode)])["pixel_values"]
        assert pixels.shape == rgb.shape
        with torch.inference_mode():
            assert torch.isfinite(model.get_image_features(pixels).pooler_output).all()


def test_empty_caption_list_is_refused(processor):
    with pytest.raises(ValueError, match="empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="needs `images`, `text`"):
        processor()


def test_two_dimensional_grayscale_arrays_are_images(processor):
    gray = red_image("L")
    from_pil = processor(images=[gray])["pixel_values"]
    array = np.asarray(gray)
    assert array.ndim == 2
    torch.testing.assert_close(processor(images=[array])["pixel_values"], from_pil)
    torch.testing.assert_close(processor(images=torch.from_numpy(array.copy()))["pixel_values"], from_pil)


def test_the_forward_pass_names_the_missing_side(model, processor):
    with pytest.raises(ValueError, match=r"images \(`pixel_values`\) are missing"):
        model(**processor(text=CAPTIONS))
    with pytest.raises(ValueError, match="captions .* are missing"):
        model(**processor(images=[red_image()]))


def test_an_empty_caption_embeds_the_template_alone(model, processor):
    """`""` is the tokenizer's special tokens (and template) alone; under a tokenizer that adds nothing around text it
    has no token at all, and the model reads its EOS token alone instead of failing on an empty sequence."""
    tokenizer = processor.tokenizer
    assert processor(text="")["input_ids"].tolist() == [[tokenizer.bos_token_id, tokenizer.eos_token_id]]
    eos = model.config.text_config.eos_token_id
    with torch.inference_mode():
        assert torch.isfinite(model.get_text_features(**processor(text="")).pooler_output).all()
        alone = model.get_text_features(torch.tensor([[eos]]), torch.ones(1, 1, dtype=torch.long)).pooler_output
        no_tokens = model.get_text_features(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long))
        batch = tokenizer(["a dog", ""], add_special_tokens=False, padding=True, return_tensors="pt")
        in_a_batch = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
    assert batch["attention_mask"][1].sum() == 0  # the empty caption is all padding here
    torch.testing.assert_close(no_tokens.pooler_output, alone)
    torch.testing.assert_close(in_a_batch[1:], alone, atol=1e-5, rtol=1e-5)


def test_the_pipeline_refuses_no_labels_and_templates_without_one_placeholder(tiny_proclip_dir):
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_proclip_dir), trust_remote_code=True)
    assert type(classifier).__name__ == "ProCLIPZeroShotImageClassificationPipeline"
    with pytest.raises(ValueError, match="No candidate labels"):
        classifier(red_image(), candidate_labels=[])
    for template in ("a photo", "{} and {}"):
        with pytest.raises(ValueError, match="exactly one '{}'"):
            classifier(red_image(), candidate_labels=["cat"], hypothesis_template=template)
    as_string = classifier(red_image(), candidate_labels="red circle, blue square")
    as_list = classifier(red_image(), candidate_labels=["red circle", "blue square"])
    assert as_string == as_list


def test_the_pipeline_warns_that_one_label_always_scores_one(tiny_proclip_dir, caplog):
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_proclip_dir), trust_remote_code=True)
    with caplog.at_level(logging.WARNING):
        (only,) = classifier(red_image(), candidate_labels=["red circle"])
    assert only["score"] == pytest.approx(1.0)
    assert "One candidate label ('red circle'): its score is 1.0 for any image" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        classifier(red_image(), candidate_labels=["red circle", "blue square"])
    assert "One candidate label" not in caplog.text


def test_encode_text_and_image_batch_in_any_order_and_size(model, processor, tmp_path):
    captions = CAPTIONS + ["", "a very long caption " * 20]
    with torch.inference_mode():
        expected = model.get_text_features(**processor(text=captions)).pooler_output
    for batch_size in (1, 2, 32):
        torch.testing.assert_close(model.encode_text(captions, batch_size=batch_size, normalize=False,
                                                     processor=processor), expected, atol=1e-5, rtol=1e-5)
    unit = model.encode_text(captions, processor=processor)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)
    short = model.encode_text(captions[0], truncate_dim=4, processor=processor, convert_to_numpy=True)
    assert short.shape == (4,) and abs(np.linalg.norm(short) - 1) < 1e-5
    with pytest.raises(ValueError, match="list of texts is empty"):
        model.encode_text([], processor=processor)

    images = [red_image(), red_image("L", (20, 50)), red_image("RGBA")]
    with torch.inference_mode():
        expected = model.get_image_features(**processor(images=images)).pooler_output
    path = tmp_path / "gray.png"
    images[1].save(path)
    buffer = io.BytesIO()
    images[2].save(buffer, format="PNG")
    sources = [images[0], str(path), "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()]
    got = model.encode_image(sources, batch_size=2, normalize=False, processor=processor)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_encode_image_fetches_urls_within_its_timeout(model, processor):
    """A real HTTP server on loopback: one image served, and one request that never answers."""
    buffer = io.BytesIO()
    red_image().save(buffer, format="PNG")
    body, release = buffer.getvalue(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                release.wait(10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        got = model.encode_image(f"{url}/red.png", processor=processor)
        torch.testing.assert_close(got, model.encode_image(red_image(), processor=processor))
        start = time.perf_counter()
        with pytest.raises(OSError):  # socket timeout (URLError / TimeoutError)
            model.encode_image(f"{url}/slow.png", processor=processor, image_policy=ImagePolicy(url_timeout=0.5))
        assert time.perf_counter() - start < 5
    finally:
        release.set()
        server.shutdown()


def test_encode_loads_the_saved_processor_when_given_none(tiny_proclip_dir):
    model = ProCLIPModel.from_pretrained(tiny_proclip_dir).eval()
    processor = ProCLIPProcessor.from_pretrained(tiny_proclip_dir)
    torch.testing.assert_close(model.encode_text(CAPTIONS), model.encode_text(CAPTIONS, processor=processor))
    assert isinstance(model.encoding_processor(), ProCLIPProcessor)
    built = ProCLIPModel(model.config)
    built.name_or_path = ""
    with pytest.raises(ValueError, match="pass `processor=`"):
        built.encode_text(CAPTIONS)


def test_vision_must_be_a_clip_checkpoint(tiny_llm_dir):
    with pytest.raises(ValueError, match="must be a CLIP checkpoint"):
        ProCLIPModel.from_towers(vision=tiny_llm_dir, text=tiny_llm_dir)


# -- real weights ---------------------------------------------------------------------------------------------------


def test_proclip_init_writes_a_loadable_folder(tmp_path, tiny_clip_dir, tiny_llm_dir):
    from proclip_train.cli import main

    main(["init", "--vision", str(tiny_clip_dir), "--text", str(tiny_llm_dir), "--out", str(tmp_path),
          "--pooling", "last_token", "--adapter-blocks", "2", "--adapter-expansion", "1"])
    model = ProCLIPModel.from_pretrained(tmp_path)
    assert (model.config.pooling, model.config.adapter_blocks, len(model.text_adapter.blocks)) == ("last_token", 2, 2)
    for name in ("configuration_proclip.py", "modeling_proclip.py", "processing_proclip.py", "images_proclip.py",
                 "embedding_proclip.py", "pipeline_proclip.py", "saving_proclip.py", "handler.py", "model.safetensors",
                 "processor_config.json", "tokenizer.json", "modules.json"):
        assert (tmp_path / name).is_file(), name


def test_installed_package_registers_the_auto_classes(tiny_proclip_dir):
    from transformers import AutoModelForZeroShotImageClassification, AutoProcessor

    assert isinstance(AutoModel.from_pretrained(tiny_proclip_dir), ProCLIPModel)
    assert isinstance(AutoModelForZeroShotImageClassification.from_pretrained(tiny_proclip_dir), ProCLIPModel)
    assert isinstance(AutoProcessor.from_pretrained(tiny_proclip_dir), ProCLIPProcessor)

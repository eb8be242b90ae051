"""The idioms users of transformers' CLIP already write, on an exported folder in a Python where this project cannot be
imported (remote code only).

One subprocess runs every idiom on the tiny exported folder (`IDIOMS`, each caught on its own so that one failure
does not hide the others) and prints what it measured; each test below asserts one idiom.
"""

import json

import pytest
from isolation import run_without_project
from PIL import Image

CAPTIONS = ["a red circle", "two blue squares on the left of a small green triangle", "a dog"]
LONG_CAPTION = " ".join(["a very long caption about many red circles"] * 40)

IDIOMS = """
import json, os, traceback
import torch
from PIL import Image
from transformers import (AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, AutoTokenizer,
                          pipeline)

images = [Image.open(f"{images_dir}/{name}.png") for name in ("red", "blue")]
results = {}


def idiom(function):
    try:
        results[function.__name__] = function()
    except Exception:
        results[function.__name__] = {"error": traceback.format_exc(limit=-3)}


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
torch.set_grad_enabled(False)
default_text = model.get_text_features(**processor(text=captions)).pooler_output


@idiom
def tutorial_call():  # every CLIP tutorial's line
    batch = processor(text=captions, images=images, return_tensors="pt", padding=True)
    outputs = model(**batch)
    return {"module": type(model).__module__, "logits_shape": list(outputs.logits_per_image.shape),
            "text_diff": max_diff(model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output,
                                  default_text)}


@idiom
def tokenizer_kwargs():  # each standard padding / truncation kwarg gives the default call's embedding
    variants = {
        "max_length": dict(padding="max_length", truncation=True, max_length=48),
        "max_length_beyond_model_limit": dict(padding="max_length", truncation=True,
                                              max_length=model.config.max_text_length + 20),
        "longest": dict(padding="longest"),
        "pad_to_multiple_of": dict(padding=True, pad_to_multiple_of=16),
        "left_padding": dict(padding=True, padding_side="left"),
        "text_kwargs": dict(text_kwargs={"padding": "max_length", "max_length": 40}),
        "numpy_then_torch": dict(return_tensors="np"),
    }
    diffs = {}
    for name, kwargs in variants.items():
        batch = processor(text=captions, **kwargs)
        ids, mask = (torch.as_tensor(batch[key]) for key in ("input_ids", "attention_mask"))
        diffs[name] = {"diff": max_diff(model.get_text_features(ids, mask).pooler_output, default_text),
                       "length": ids.shape[-1]}
    return diffs


@idiom
def truncation_keeps_the_template_end():
    tokenizer = processor.tokenizer
    suffix = model.config.text_suffix_length
    ids = processor(text=[long_caption], truncation=True, max_length=12)["input_ids"][0].tolist()
    full = tokenizer(long_caption)["input_ids"]
    return {"length": len(ids), "tail": ids[-suffix:], "full_tail": full[-suffix:], "suffix_length": suffix}


@idiom
def features_from_processor_outputs():
    text = model.get_text_features(**processor(text=captions)).pooler_output
    image = model.get_image_features(**processor(images=images)).pooler_output
    outputs = model(**processor(text=captions, images=images))
    return {"text_shape": list(text.shape), "image_shape": list(image.shape),
            "text_diff": max_diff(torch.nn.functional.normalize(text, dim=-1), outputs.text_embeds),
            "image_diff": max_diff(torch.nn.functional.normalize(image, dim=-1), outputs.image_embeds)}


@idiom
def return_dict_false_and_return_loss():
    batch = processor(text=captions[:2], images=images)
    outputs = model(**batch, return_loss=True)
    as_tuple = model(**batch, return_loss=True, return_dict=False)
    labels = torch.arange(2)
    by_hand = (torch.nn.functional.cross_entropy(outputs.logits_per_image, labels)
               + torch.nn.functional.cross_entropy(outputs.logits_per_text, labels)) / 2
    return {"is_tuple": isinstance(as_tuple, tuple), "loss": outputs.loss.item(), "loss_by_hand": by_hand.item(),
            "tuple_loss": as_tuple[0].item(), "tuple_logits_diff": max_diff(as_tuple[1], outputs.logits_per_image)}


@idiom
def zero_shot_auto_class():
    zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    batch = processor(text=captions, images=images)
    return {"class": type(zero_shot).__name__, "diff": max_diff(zero_shot(**batch).logits_per_image,
                                                                model(**batch).logits_per_image)}


@idiom
def save_pretrained_then_reload():
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    files = sorted(name for name in os.listdir(saved) if name.endswith(".py"))
    again = AutoModel.from_pretrained(saved, trust_remote_code=True).eval()
    again_processor = AutoProcessor.from_pretrained(saved, trust_remote_code=True)
    batch = again_processor(text=captions, images=images)
    return {"code_files": files, "module": type(again).__module__,
            "diff": max_diff(again(**batch).logits_per_image, model(**batch).logits_per_image)}


@idiom
def bfloat16_loading():
    bf16 = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    outputs = bf16(**processor(text=captions, images=images))
    reference = model(**processor(text=captions, images=images))
    cosine = torch.nn.functional.cosine_similarity
    return {"dtype": str(bf16.dtype), "embeds_dtype": str(outputs.text_embeds.dtype),
            "text_cosine": cosine(outputs.text_embeds.float(), reference.text_embeds).min().item(),
            "image_cosine": cosine(outputs.image_embeds.float(), reference.image_embeds).min().item()}


@idiom
def pipeline_on_a_batch_of_images():
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    labels = ["red circle", "blue square", "green triangle"]
    answers = classifier(images, candidate_labels=labels)
    probs = model(**processor(text=[f"This is a photo of {label}." for label in labels], images=images))
    probs = probs.logits_per_image.softmax(-1)
    return {"pipeline_class": type(classifier).__name__,
            "scores": [{r["label"]: r["score"] for r in answer} for answer in answers],
            "expected": [dict(zip(labels, row)) for row in probs.tolist()]}


@idiom
def sentence_transformers():
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    return {"text_diff": max_diff(torch.as_tensor(st.encode(captions)), model.encode_text(captions)),
            "image_diff": max_diff(torch.as_tensor(st.encode(images)), model.encode_image(images))}


@idiom
def encode_text_and_image():
    text = model.encode_text(captions, batch_size=2)
    image = model.encode_image(images + [f"{images_dir}/red.png"], convert_to_numpy=True)
    expected = torch.nn.functional.normalize(model.get_image_features(**processor(images=images)).pooler_output, dim=-1)
    return {"text_diff": max_diff(text, torch.nn.functional.normalize(default_text, dim=-1)),
            "image_diff": max_diff(torch.as_tensor(image[:2]), expected),
            "path_diff": max_diff(torch.as_tensor(image[2]), expected[0]), "numpy": type(image).__module__}


print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def idioms(tiny_proclip_dir, tmp_path_factory):
    images = tmp_path_factory.mktemp("idiom_images")
    Image.new("RGB", (40, 36), (200, 30, 30)).save(images / "red.png")
    Image.new("RGB", (30, 50), (20, 40, 220)).save(images / "blue.png")
    saved = tmp_path_factory.mktemp("idiom_saved")
    inputs = (f"folder, images_dir, saved = {str(tiny_proclip_dir)!r}, {str(images)!r}, {str(saved)!r}\n"
              f"captions, long_caption = {CAPTIONS!r}, {LONG_CAPTION!r}\n")
    return run_without_project(inputs + IDIOMS)


def measured(idioms, name):
    """The idiom's measurements; its traceback as the failure message if it raised."""
    result = idioms[name]
    assert "error" not in result, result.get("error")
    return result


def test_the_tutorial_call_with_padding_true(idioms):
    result = measured(idioms, "tutorial_call")
    assert result["module"].startswith("transformers_modules.")  # remote code, not this project
    assert result["logits_shape"] == [2, len(CAPTIONS)]
    assert result["text_diff"] < 1e-5


def test_every_padding_and_truncation_kwarg_gives_the_default_embedding(idioms):
    result = measured(idioms, "tokenizer_kwargs")
    assert result["max_length"]["length"] == 48 and result["pad_to_multiple_of"]["length"] % 16 == 0
    assert result["max_length_beyond_model_limit"]["length"] > 512  # padded past the model's limit, cut by the model
    for name, variant in result.items():
        assert variant["diff"] < 1e-5, (name, variant)


def test_truncation_by_the_caller_keeps_the_template_end(idioms):
    result = measured(idioms, "truncation_keeps_the_template_end")
    assert result["length"] == 12 and result["suffix_length"] >= 1
    assert result["tail"] == result["full_tail"]


def test_features_take_the_processor_outputs_as_keywords(idioms):
    result = measured(idioms, "features_from_processor_outputs")
    assert result["text_shape"][0] == len(CAPTIONS) and result["image_shape"][0] == 2
    assert result["text_diff"] < 1e-5 and result["image_diff"] < 1e-5


def test_return_dict_false_is_a_tuple_and_return_loss_is_clips_loss(idioms):
    result = measured(idioms, "return_dict_false_and_return_loss")
    assert result["is_tuple"] and result["tuple_logits_diff"] == 0
    assert result["loss"] == pytest.approx(result["loss_by_hand"], abs=1e-6) == result["tuple_loss"]


def test_auto_model_for_zero_shot_image_classification(idioms):
    result = measured(idioms, "zero_shot_auto_class")
    assert result["class"] == "ProCLIPModel" and result["diff"] == 0


def test_save_pretrained_of_a_remote_code_model_carries_its_code(idioms):
    result = measured(idioms, "save_pretrained_then_reload")
    code = {"configuration_proclip.py", "modeling_proclip.py", "processing_proclip.py", "images_proclip.py",
            "embedding_proclip.py", "pipeline_proclip.py", "saving_proclip.py"}
    assert code <= set(result["code_files"])
    assert result["module"].startswith("transformers_modules.") and result["diff"] == 0


def test_bfloat16_loading(idioms):
    result = measured(idioms, "bfloat16_loading")
    assert result["dtype"] == result["embeds_dtype"] == "torch.bfloat16"
    assert result["text_cosine"] > 0.99 and result["image_cosine"] > 0.99


def test_the_pipeline_on_a_batch_of_images(idioms):
    result = measured(idioms, "pipeline_on_a_batch_of_images")
    assert result["pipeline_class"] == "ProCLIPZeroShotImageClassificationPipeline"  # named in config.json
    assert len(result["scores"]) == 2
    for scores, expected in zip(result["scores"], result["expected"]):
        assert scores == pytest.approx(expected, abs=1e-5)


def test_sentence_transformers_on_texts_and_images(idioms):
    result = measured(idioms, "sentence_transformers")
    assert result["text_diff"] < 1e-5 and result["image_diff"] < 1e-5


def test_encode_text_and_encode_image_through_remote_code(idioms):
    result = measured(idioms, "encode_text_and_image")
    assert result["numpy"] == "numpy"
    assert max(result["text_diff"], result["image_diff"], result["path_diff"]) < 1e-5


def test_the_idioms_ran_where_the_project_cannot_be_imported(idioms):
    assert json.dumps(idioms)  # the subprocess printed its results; `run_without_project` blocked the project
    assert len(idioms) == IDIOMS.count("@idiom")

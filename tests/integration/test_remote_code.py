"""The remote-code face in a Python where this project cannot be imported: the zero-shot pipeline, the Endpoints
handler, and folders built on the real MiniLM and SmolLM2 towers, each equal to the installed model's outputs."""

import base64
import io

import pytest
import torch
from conftest import build_tiny_clip, minilm_folder, red_image
from isolation import run_without_project

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

CAPTIONS = ["a red circle", "two blue squares on the left of a small green triangle", "a dog"]


def test_remote_code_pipeline_scores_equal_softmax_of_the_models_own_logits(tiny_proclip_dir):
    image_path = tiny_proclip_dir.parent / "red.png"
    red_image().save(image_path)
    result = run_without_project(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, pipeline
        folder, image = {str(tiny_proclip_dir)!r}, Image.open({str(image_path)!r})
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        labels = ["red circle", "blue square", "green triangle"]
        classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        scores = {{r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)}}
        batch = processor(images=image, text=[f"This is a photo of {{l}}." for l in labels])
        with torch.inference_mode():
            probs = model(**batch).logits_per_image.softmax(-1)[0].tolist()
        print(json.dumps({{"module": type(model).__module__, "pipeline": [scores[l] for l in labels], "model": probs}}))
        """
    )
    assert result["module"].startswith("transformers_modules.")
    assert result["pipeline"] == pytest.approx(result["model"], abs=1e-5)


def test_endpoint_handler_scores_a_base64_png(tiny_proclip_dir, model, processor):
    buffer = io.BytesIO()
    red_image().save(buffer, format="PNG")
    payload = base64.b64encode(buffer.getvalue()).decode()
    result = run_without_project(
        f"""
        import json, sys
        sys.path.insert(0, {str(tiny_proclip_dir)!r})
        from handler import EndpointHandler
        handler = EndpointHandler({str(tiny_proclip_dir)!r})
        out = handler({{"inputs": {payload!r}, "parameters": {{"candidate_labels": ["red", "blue", "green"]}}}})
        print(json.dumps([out, handler({{"inputs": ["a red circle", "ein Kreis"]}})]))
        """
    )
    result, features = result  # zero-shot, and the Inference API's feature extraction
    expected = model.encode_text(["a red circle", "ein Kreis"], processor=processor)
    torch.testing.assert_close(torch.tensor(features), expected, atol=1e-5, rtol=1e-4)
    labels = ["red", "blue", "green"]
    with torch.inference_mode():
        batch = processor(images=red_image(), text=[f"This is a photo of {label}." for label in labels])
        probs = model(**batch).logits_per_image.softmax(-1)[0].tolist()
    assert [r["label"] for r in result] == [l for _, l in sorted(zip(probs, labels), reverse=True)]
    assert [r["score"] for r in result] == pytest.approx(sorted(probs, reverse=True), abs=1e-5)


def _export_and_compare_through_remote_code(out_dir, clip_dir, text_dir):
    model = ProCLIPModel.from_towers(vision=clip_dir, text=text_dir, adapter_expansion=1).eval()
    processor = ProCLIPProcessor.from_towers(clip_dir, text_dir, model.config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with torch.inference_mode():
        expected = model.get_text_features(**processor(text=CAPTIONS)).pooler_output
    remote = run_without_project(
        f"""
        import json, torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(out_dir)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(out_dir)!r}, trust_remote_code=True)
        with torch.inference_mode():
            print(json.dumps(model.get_text_features(**processor(text={CAPTIONS!r})).pooler_output.tolist()))
        """
    )
    torch.testing.assert_close(torch.tensor(remote), expected, atol=1e-5, rtol=1e-4)
    return model


@pytest.mark.real_weights
def test_real_minilm_text_tower_exports_and_reloads(tmp_path, tiny_clip_dir):
    model = _export_and_compare_through_remote_code(tmp_path / "out", tiny_clip_dir, minilm_folder())
    assert model.config.pooling == "mean" and model.config.text_suffix_length == 1  # [SEP]


@pytest.mark.real_weights
@pytest.mark.usefixtures("smollm2_package")
def test_real_smollm2_text_tower_exports_and_reloads(tmp_path):
    from proclip_train.training.packaged_towers import packaged_tower_dir

    clip_dir = build_tiny_clip(tmp_path / "clip")
    model = _export_and_compare_through_remote_code(tmp_path / "out", clip_dir, packaged_tower_dir("smollm2"))
    assert model.config.text_hidden_size == 576

"""`proclip push` runs nobody's code with the user's credentials (issue 12, item 3): a folder whose code is not the
installed package's is refused before any of it runs, and with `--allow-modified-code` the code runs in a Python that
cannot find the token the parent holds."""

import json
import shutil
import textwrap

import pytest
from proclip_train import cli
from proclip_train.hub.publish.card import write_model_card
from proclip_train.hub.publish.push import code_differences, environment_without_credentials

REPO_ID = "my-org/proclip-tiny"
SECRETS = {
    "HF_TOKEN": "hf_secret_from_HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN": "hf_secret_from_HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY": "secret_from_aws",
}
FILE_SECRETS = ("hf_secret_from_the_token_file", "hf_secret_from_HF_HOME", "hf_secret_from_stored_tokens")

# Appended to the folder's modeling_proclip.py: runs when the model's code is imported, looks for credentials where
# huggingface_hub (and a curious payload) would, and writes down everything it found.
PAYLOAD = textwrap.dedent(
    """

    def _look_for_credentials():
        import json as _json
        import os as _os

        import huggingface_hub as _hub

        seen = {"environment": dict(_os.environ), "get_token": _hub.get_token(), "files": {}}
        home = _os.environ.get("HF_HOME", "")
        for path in (_os.environ.get("HF_TOKEN_PATH", ""), _os.path.join(home, "token"),
                     _os.environ.get("HF_STORED_TOKENS_PATH", ""), _os.path.join(home, "stored_tokens"),
                     _os.path.expanduser("~/.cache/huggingface/token")):
            if path and _os.path.isfile(path):
                with open(path) as f:
                    seen["files"][path] = f.read()
        with open(REPORT, "w") as f:
            _json.dump(seen, f)


    _look_for_credentials()
    """
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_proclip_dir):
    folder = tmp_path_factory.mktemp("safety") / "proclip-tiny"
    shutil.copytree(tiny_proclip_dir, folder)
    write_model_card(folder, repo_id=REPO_ID)
    return folder


def _copy(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def _refusal(capsys, folder, *flags):
    with pytest.raises(SystemExit) as refused:
        cli.main(["push", "--model", str(folder), "--repo-id", REPO_ID, "--dry-run", *flags])
    assert refused.value.code == 2
    return capsys.readouterr().err


def test_a_tampered_code_file_is_refused_before_it_runs(folder, tmp_path, capsys):
    tampered = _copy(folder, tmp_path)
    ran = tmp_path / "payload-ran"
    with open(tampered / "modeling_proclip.py", "a") as f:
        f.write(f"\nopen({str(ran)!r}, 'w').close()\n")
    error = _refusal(capsys, tampered)
    assert error.startswith(f"proclip push: error: refused: {tampered} holds code that is not this installed ProCLIP's")
    assert "modeling_proclip.py: differs from the installed package's copy (+2 -0 lines)" in error
    assert "--allow-modified-code" in error and "copy_remote_code" in error
    assert not ran.exists()


def test_an_auto_map_entry_pointing_at_an_extra_module_is_refused(folder, tmp_path, capsys):
    extra = _copy(folder, tmp_path)
    ran = tmp_path / "payload-ran"
    (extra / "evil.py").write_text(
        f"open({str(ran)!r}, 'w').close()\nfrom .modeling_proclip import ProCLIPModel as EvilModel\n"
    )
    config = json.loads((extra / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "evil.EvilModel"
    (extra / "config.json").write_text(json.dumps(config))
    error = _refusal(capsys, extra)
    assert "config.json: auto_map.AutoModel -> evil.EvilModel points outside the package's code files" in error
    assert "evil.py: an extra code file" in error
    assert not ran.exists()


def test_every_kind_of_code_reference_is_checked(folder, tmp_path):
    """Nested auto_maps (processor_config.json's image processor), tokenizer lists, cross-repo references, custom
    pipelines and sentence-transformers modules; the folder as saved has none of these problems."""
    assert code_differences(folder) == []
    changed = _copy(folder, tmp_path)
    processor = json.loads((changed / "processor_config.json").read_text())
    processor["image_processor"]["auto_map"]["AutoImageProcessor"] = "image_processing_x.Processor"
    (changed / "processor_config.json").write_text(json.dumps(processor))
    tokenizer = json.loads((changed / "tokenizer_config.json").read_text())
    tokenizer["auto_map"]["AutoTokenizer"] = ["tokenization_x.Slow", None]
    tokenizer["auto_map"]["AutoProcessor"] = "someone/repo--processing_proclip.ProCLIPProcessor"
    (changed / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    config = json.loads((changed / "config.json").read_text())
    config["custom_pipelines"] = {"zero-shot-image-classification": {"impl": "pipeline_x.Pipeline"}}
    (changed / "config.json").write_text(json.dumps(config))
    modules = json.loads((changed / "modules.json").read_text())
    extra = len(modules)  # after the folder's own modules (Transformer, Normalize)
    modules.append({"idx": extra, "name": str(extra), "path": "", "type": "custom_module.Layer"})
    (changed / "modules.json").write_text(json.dumps(modules))
    problems = sorted(d.problem.split(" points outside")[0] for d in code_differences(changed))
    assert problems == [
        "config.json: custom_pipelines.zero-shot-image-classification.impl -> pipeline_x.Pipeline",
        f"modules.json: {extra}.type -> custom_module.Layer",
        "processor_config.json: image_processor.auto_map.AutoImageProcessor -> image_processing_x.Processor",
        "tokenizer_config.json: auto_map.AutoProcessor -> someone/repo--processing_proclip.ProCLIPProcessor",
        "tokenizer_config.json: auto_map.AutoTokenizer -> tokenization_x.Slow",
    ]


def test_allowed_modified_code_is_listed_and_cannot_find_the_parents_token(folder, tmp_path, capsys, monkeypatch):
    modified = _copy(folder, tmp_path)
    report = tmp_path / "what-the-payload-saw.json"
    with open(modified / "modeling_proclip.py", "a") as f:
        f.write(f"\nREPORT = {str(report)!r}\n" + PAYLOAD)

    # The parent holds a token in every place huggingface_hub looks.
    token_file, hf_home = tmp_path / "tokens" / "token", tmp_path / "hf_home"
    token_file.parent.mkdir()
    hf_home.mkdir()
    token_file.write_text(FILE_SECRETS[0])
    (hf_home / "token").write_text(FILE_SECRETS[1])
    (hf_home / "stored_tokens").write_text(f"[default]\nhf_token = {FILE_SECRETS[2]}\n")
    for name, value in {**SECRETS, "HF_TOKEN_PATH": str(token_file), "HF_HOME": str(hf_home)}.items():
        monkeypatch.setenv(name, value)
    import huggingface_hub

    assert huggingface_hub.get_token() == SECRETS["HF_TOKEN"]  # the parent can read it

    cli.main(["push", "--model", str(modified), "--repo-id", REPO_ID, "--dry-run", "--allow-modified-code"])
    out = capsys.readouterr().out
    assert "--allow-modified-code: 1 difference(s) from the installed ProCLIP's code" in out
    assert "modeling_proclip.py: differs from the installed package's copy" in out
    assert "+_look_for_credentials()" in out  # the diff is shown
    assert "checks passed" in out and "modified code (allowed, listed above)" in out

    seen = json.loads(report.read_text())  # the payload ran, in the isolated Python
    assert seen["environment"]["HF_HUB_OFFLINE"] == "1" and seen["get_token"] is None
    text = json.dumps(seen)
    for secret in [*SECRETS.values(), *FILE_SECRETS]:
        assert secret not in text
    assert not set(SECRETS) & set(seen["environment"])


def test_the_environment_keeps_what_is_not_a_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    monkeypatch.setenv("MY_API_KEY", "k")
    environment = environment_without_credentials(tmp_path)
    assert environment["TOKENIZERS_PARALLELISM"] == "true" and environment["PATH"]
    assert "GITHUB_TOKEN" not in environment and "MY_API_KEY" not in environment
    assert environment["HOME"] == str(tmp_path / "home") and not any((tmp_path / "home" / "huggingface").iterdir())

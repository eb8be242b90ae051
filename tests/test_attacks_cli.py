"""Attacks on the command line (issue 25), run as a user runs them (a subprocess): what a table names outside its
data folder is neither read nor fetched, poisoned (non-finite) weights are never scored or published, and a mistake
ends in a sentence (exit 2), not a traceback."""

import pytest
from test_cli_errors import proclip

# -- item 1: image URLs in a table ----------------------------------------------------------------------------------


@pytest.fixture
def url_pairs(tmp_path, counting_image_server):
    """`data/pairs.csv`: two rows whose image is an http URL to the loopback server."""
    base, _ = counting_image_server
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.csv").write_text(f"image,caption\n{base}/a.png,a red square\n{base}/b.png,a cat\n")
    return tmp_path / "data" / "pairs.csv"


def assert_refused(result, *phrases: str) -> None:
    """Exit code 2, no traceback, the last line naming the problem."""
    error = result.stderr.strip()
    assert result.returncode == 2, (result.returncode, error)
    assert "Traceback" not in error, error
    for phrase in phrases:
        assert phrase in error.splitlines()[-1], (phrase, error)


@pytest.mark.parametrize("environment", ["online", "HF_DATASETS_OFFLINE=1"])
def test_eval_fetches_no_url_unless_allowed_and_never_offline(tiny_proclip_dir, url_pairs, counting_image_server,
                                                              environment):
    """Old code: `proclip eval` fetched both URLs, with HF_DATASETS_OFFLINE=1 too."""
    _, requested = counting_image_server
    command = ["eval", "--model", tiny_proclip_dir, "--task", "retrieval", "--data", url_pairs]
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"{counting_image_server[0]}/hub"}  # the Hub is not asked either
    if environment == "online":
        result, _ = proclip(*command, env=env)
        assert_refused(result, "2 rows whose image is a URL", "pass --allow-remote-images to fetch them")
    else:
        result, _ = proclip(*command, "--allow-remote-images", env={**env, "HF_DATASETS_OFFLINE": "1"})
        assert_refused(result, "2 rows whose image is a URL", "nothing is fetched offline")
    assert requested == []

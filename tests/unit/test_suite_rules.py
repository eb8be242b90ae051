"""Rules of the test suite itself: the tiers hold what they say, and nothing can skip silently in CI.

- An optional package is asked for through `conftest.require_module` / `require_package` (skip locally, fail under
  `CI=true`), never through `pytest.importorskip` or a bare `pytest.skip`, which would let CI pass having tested
  nothing.
- `tests/unit` runs in one process: no subprocess, no torchrun, no server, no demo; those belong to
  `tests/integration`.
"""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SKIPS = re.compile(r"\bimportorskip\(|\bpytest\.skip\(")
OUT_OF_PROCESS = re.compile(
    r"\bsubprocess\b|\bPopen\b|\bmp\.spawn\b|torch\.distributed\.run|run_without_project|\bquick_demo\b|\bDemo\("
)


def test_optional_packages_are_required_through_conftest():
    offenders = [
        f"{path.relative_to(TESTS)}:{number}"
        for path in sorted(TESTS.rglob("*.py")) if path.name != "conftest.py"
        for number, line in enumerate(path.read_text().splitlines(), 1) if SKIPS.search(line)
    ]
    assert offenders == [], "use conftest.require_module / require_package instead: " + ", ".join(offenders)


def test_the_unit_tier_stays_in_process():
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((TESTS / "unit").glob("test_*.py")) if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text().splitlines(), 1) if OUT_OF_PROCESS.search(line)
    ]
    assert offenders == [], "move these tests to tests/integration: " + ", ".join(offenders)


def test_each_file_stays_on_one_worker(request):
    """Under `-n N --dist loadgroup` (the default `addopts`) xdist suffixes every node id with its group, conftest's file
    (or the quick demo's group): a module's fixtures, and the demo, are then built on one worker only. Without workers
    there is nothing to group and the node id is plain."""
    grouped = bool(request.config.getoption("loadgroup", False))
    assert request.node.nodeid.endswith("@tests/unit/test_suite_rules.py") == grouped, request.node.nodeid
    if grouped:  # the integration files are given out first, the unit files fill the end
        tiers = [item.nodeid.startswith("tests/unit/") for item in request.session.items]
        assert tiers == sorted(tiers), "a unit test is collected before an integration test"

"""bench/verification_policies.py --cache: a command's figures are reused only for the same key, and a
guarded run's key holds the policy in force, not the file's name or comments."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import verification_policies as bench  # noqa: E402


def test_figures_are_computed_once_per_key(tmp_path):
    computed = []

    def compute(value):
        computed.append(value)
        return {"final_eval_loss": value}

    assert bench.cached(tmp_path, "bf16-0", ["bf16", ["seed=0"]], lambda: compute(1.5)) == {"final_eval_loss": 1.5}
    assert bench.cached(tmp_path, "bf16-0", ["bf16", ["seed=0"]], lambda: compute(9.9)) == {"final_eval_loss": 1.5}
    assert bench.cached(tmp_path, "bf16-0", ["bf16", ["seed=1"]], lambda: compute(1.6)) == {"final_eval_loss": 1.6}
    assert bench.cached(None, "bf16-0", ["bf16", ["seed=0"]], lambda: compute(1.7)) == {"final_eval_loss": 1.7}
    assert computed == [1.5, 1.6, 1.7]
    assert not list(tmp_path.glob("*.partial"))


def test_a_policy_renamed_or_recommented_keeps_its_key_and_an_edited_one_does_not(tmp_path):
    text = (REPO / "policies" / "fixed.yaml").read_text()
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text("# another comment\n" + text)
    edited = tmp_path / "edited.yaml"
    edited.write_text(text.replace("  switch: 0.015 ", "  switch: 0.02 "))
    fixed = bench.policy_in_force(REPO / "policies" / "fixed.yaml")
    assert bench.policy_in_force(renamed) == fixed
    assert bench.policy_in_force(edited) != fixed
    assert bench.policy_in_force(REPO / "policies" / "default.yaml") != fixed

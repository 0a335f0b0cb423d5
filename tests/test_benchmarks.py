"""The benchmark harness: the statistics of the evidence protocol (bootstrap, McNemar, lr selection, run ids), the
baselines' initial functions, the random-allocation control, and the `smoke` / `evidence-smoke` suites end to end on
tiny config-built models (a few steps), with the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from benchmarks.harness import capacity_suites, methods, paired_stats, provenance, report_doc, run, suites  # noqa: E402
from benchmarks.harness.specs import gate_specs, main_specs, suite_specs, tune_specs  # noqa: E402
from benchmarks.harness.suites import ABLATION_METHODS, EVIDENCE, MAIN_METHODS  # noqa: E402
from benchmarks.harness.worker import NOT_IN_RUN_ID, REQUIRED_FIELDS, run_id  # noqa: E402

from helpers import cls_batches, make_bert  # noqa: E402

_PEFT = tuple(int(x) for x in peft.__version__.split(".")[:2])
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # the evidence harness, not the package: its baselines need peft>=0.19 (LoRA-GA; AdaLoRA with
    # orth_reg_weight=0, which 0.17 refuses) and its tasks reasoning-gym, so it runs in the newest-release env
    pytest.mark.skipif(
        _PEFT < (0, 19) or importlib.util.find_spec("reasoning_gym") is None,
        reason=f"the benchmark harness needs peft>=0.19 (LoRA-GA) and reasoning-gym (here peft {peft.__version__})",
    ),
]


def _git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    identity = ["-c", "user.name=gora-tests", "-c", "user.email=tests@localhost", "-c", "commit.gpgsign=false"]
    return subprocess.run(
        ["git", *identity, *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout


def _make_repository(repo: Path) -> Path:
    """A git repository with one committed code file (code.py) and nothing else."""
    repo.mkdir(parents=True, exist_ok=True)
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 0\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "code")
    return repo


@pytest.fixture(scope="module", autouse=True)
def own_repository(tmp_path_factory):
    """The suites lock the code state of the git checkout they run from; here that is a repository of the tests' own,
    never the checkout the tests live in (which may hold anything: the suite's own log, a half-edited file, another
    run's outputs, a second test session)."""
    repo = _make_repository(tmp_path_factory.mktemp("repo"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(provenance, "ROOT", repo)
        yield repo


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert run.main(["smoke", "--out", str(out)]) == 0, (out / "smoke.errors.jsonl").read_text()
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]


def test_smoke_suite_gives_every_method_a_complete_line(smoke_results: Path) -> None:
    records = _records(smoke_results)
    nlu = {r["method"]: r for r in records if r["task"] == "smoke-nlu"}
    assert set(nlu) == {*MAIN_METHODS, *ABLATION_METHODS, "init-cost"}
    assert {r["method"] for r in records if r["task"] == "smoke-nlg"} == {"lora", "gora"}
    for r in records:
        missing = [f for f in REQUIRED_FIELDS if f not in r]
        assert not missing, (r["method"], missing)
        if r["method"] != "init-cost":
            assert 0.0 <= r["metric"] <= 1.0
            assert r["trainable_params"] > 0 and r["train_s"] > 0 and r["step_s"] > 0
            assert r["peak_rss_mb"] > 0 and r["loss_curve"]
    # budgets: the LoRA family at the same count, GoRA's matched variant closest to it, full FT far above
    assert nlu["lora"]["trainable_params"] == nlu["rslora"]["trainable_params"] == nlu["pissa"]["trainable_params"]
    assert nlu["full"]["trainable_params"] > 10 * nlu["lora"]["trainable_params"]
    ref = nlu["lora"]["adapter_params"]
    assert abs(nlu["gora-matched"]["adapter_params"] - ref) <= abs(nlu["gora"]["adapter_params"] - ref)
    assert nlu["gora-fixed"]["adapter_params"] == ref
    # AdaLoRA really reallocates: update_and_allocate runs every step and prunes toward target_r
    info = nlu["adalora"]["info"]
    assert info["adalora_update_calls"] == nlu["adalora"]["steps"]
    assert info["adalora_rank_total_end"] < info["adalora_rank_total_start"]
    assert set(nlu["init-cost"]["cost"]["ratio_to_plain"]) == {"gora", "gora_estimate", "loraga", "eva"}
    # every run saved a training checkpoint (at least after its last step) and deleted it once its record was written
    assert (smoke_results / "smoke.checkpoints").is_dir()
    assert not list((smoke_results / "smoke.checkpoints").iterdir())
    assert all(r["resumed_at"] == [] for r in records if r["method"] != "init-cost")


class _Killed(Exception):
    pass


class _CutAt(list):
    """Training batches whose item `at` kills the run: what a session's end does to a worker mid-training."""

    def __init__(self, items: list, at: int) -> None:
        super().__init__(items)
        self.at = at

    def __getitem__(self, index):
        if index == self.at:
            raise _Killed(index)
        return super().__getitem__(index)


def test_a_training_run_cut_short_resumes_from_its_checkpoint_with_the_same_numbers(tmp_path: Path) -> None:
    """Protects 'runs never lose finished work' in the harness: a run killed after step 7 of 12 resumes from its
    checkpoint and ends with the same loss curve and the same trained weights, bit for bit, as a run never stopped
    (LoRA dropout on, and another RNG state at the restart, so the saved RNG state must be the one used; the optimizer
    and the lr schedule continue, not restart); a finished checkpoint is not trained again; a checkpoint of another
    run is refused, not silently used or overwritten."""
    from benchmarks.harness.training import train
    from peft import LoraConfig, get_peft_model

    def model():
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.2, modules_to_save=["classifier"])
        return get_peft_model(make_bert(), config)

    batches = cls_batches(n=12)

    def run_(m, data, **kw):
        torch.manual_seed(5)
        return train(m, data, lr=1e-2, **kw)

    reference_model = model()
    reference = run_(reference_model, batches)
    expected = {n: p.detach().clone() for n, p in reference_model.named_parameters() if p.requires_grad}

    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Killed):
        run_(model(), _CutAt(batches, 7), checkpoint=ckpt, checkpoint_every_s=0, checkpoint_key="run")
    assert torch.load(ckpt, weights_only=False)["done"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # saved atomically: no temporary file left

    resumed_model = model()
    torch.manual_seed(123)
    resumed = train(resumed_model, batches, lr=1e-2, checkpoint=ckpt, checkpoint_every_s=0, checkpoint_key="run")
    assert resumed.resumed_at == [7] and resumed.steps == 12
    assert resumed.loss_curve == reference.loss_curve
    for name, param in resumed_model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, expected[name]), name

    again_model = model()
    again = train(again_model, batches, lr=1e-2, checkpoint=ckpt, checkpoint_key="run")
    assert again.resumed_at == [7, 12] and again.loss_curve == reference.loss_curve
    assert all(torch.equal(p, expected[n]) for n, p in again_model.named_parameters() if p.requires_grad)

    with pytest.raises(RuntimeError, match=r"belongs to another run.*delete it"):
        train(model(), batches, lr=1e-2, checkpoint=ckpt, checkpoint_key="another run")


def test_a_worker_killed_mid_training_resumes_with_the_record_of_an_uncut_run(tmp_path: Path, monkeypatch) -> None:
    """Protects the harness's resume end to end (the worker rebuilds the model, GoRA's calibration and init
    included, then loads the checkpoint): a GoRA run killed after half of its steps and run again gives the same
    metric, loss curve and eval loss as the same run never stopped, and says where it resumed."""
    from benchmarks.harness import worker

    (spec,) = [s for s in suite_specs("smoke") if s["task"] == "smoke-nlg" and s["method"] == "gora"]
    uncut = worker.run_spec(spec)
    ckpt = tmp_path / "ckpt.pt"
    real_train = worker.train

    def killed_halfway(model, batches, **kw):
        return real_train(model, _CutAt(batches, len(batches) // 2), **kw)

    monkeypatch.setattr(worker, "train", killed_halfway)
    with pytest.raises(_Killed):
        worker.run_spec(spec, ckpt, 0.0)
    monkeypatch.setattr(worker, "train", real_train)
    resumed = worker.run_spec(spec, ckpt, 0.0)
    assert resumed["resumed_at"] == [uncut["steps"] // 2] and uncut["resumed_at"] == []
    assert resumed["loss_curve"] == uncut["loss_curve"]
    assert (resumed["metric"], resumed["eval_loss"]) == (uncut["metric"], uncut["eval_loss"])


def test_rerun_skips_finished_runs(smoke_results: Path, own_repository: Path) -> None:
    before = len(_records(smoke_results))
    (own_repository / "log.txt").write_text("a log written into the checkout between two runs\n")
    assert run.main(["smoke", "--out", str(smoke_results), "--methods", "lora"]) == 0
    assert len(_records(smoke_results)) == before


def test_report_renders_and_keeps_text_outside_its_markers(smoke_results: Path, tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\n## Memory\n\nhand-written memory section\n")
    assert report_doc.main(["--results", str(smoke_results), "--out", str(doc)]) == 0
    first = doc.read_text()
    assert report_doc.BEGIN in first and report_doc.END in first and "hand-written memory section" in first
    assert first.count("# Benchmarks\n") == 1 and first.index(report_doc.END) < first.index("## Memory")
    assert "| `gora` |" in first and "| `adalora` |" in first and "Initialization cost" in first
    assert report_doc.main(["--results", str(smoke_results), "--out", str(doc)]) == 0
    assert doc.read_text() == first  # idempotent, memory section untouched
    assert (doc.parent / "img" / "loss_smoke-nlu.png").is_file()


# --- statistics ------------------------------------------------------------------------------------------------------


def test_bootstrap_of_a_constant_difference_is_that_constant():
    """Protects the interval's centre: identical per-example differences give a zero-width interval at that value."""
    mean, low, high = paired_stats.paired_bootstrap(np.full((8, 500), 1.0), n_boot=200)
    assert mean == low == high == 1.0


def test_bootstrap_over_examples_matches_the_normal_interval():
    """Protects the example resampling: with one seed, the 95% interval of a mean of 0/1 differences is close to
    mean ± 1.96·sd/√n (n = 4,000, a known case)."""
    rng = np.random.default_rng(1)
    d = rng.choice([-1, 0, 1], size=(1, 4000), p=[0.1, 0.75, 0.15]).astype(float)
    mean, low, high = paired_stats.paired_bootstrap(d, n_boot=4000, seed=2)
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)


def test_bootstrap_resamples_seeds_too():
    """Protects the seed resampling: when seeds disagree (+1 on half, −1 on the other half, no example noise) the
    interval is wide and covers 0; one value per seed (1-D) is bootstrapped over seeds alone."""
    d = np.vstack([np.ones((4, 300)), -np.ones((4, 300))])
    _, low, high = paired_stats.paired_bootstrap(d, n_boot=2000)
    assert low < -0.3 and high > 0.3
    _, low1, high1 = paired_stats.paired_bootstrap(np.array([1.0, -1.0] * 4), n_boot=2000)
    assert low1 < 0 < high1


def test_mcnemar_on_hand_computed_tables():
    """Protects the exact test: b = 10, c = 2 gives 2·(C(12,0)+C(12,1)+C(12,2))/2^12 = 158/4096; b = 5, c = 0 gives
    2/32; no discordant pair or b = c gives 1."""
    assert paired_stats.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert paired_stats.mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    assert paired_stats.mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert paired_stats.mcnemar_exact(0, 0) == 1.0 and paired_stats.mcnemar_exact(7, 7) == 1.0
    assert paired_stats.discordant([[1, 1, 0, 0]], [[1, 0, 1, 0]]) == (1, 1)


def test_verdict_from_the_interval():
    assert paired_stats.verdict(0.001, 0.02) == "better"
    assert paired_stats.verdict(-0.02, -0.001) == "worse"
    assert paired_stats.verdict(-0.01, 0.01) == "tied" and paired_stats.verdict(0.0, 0.01) == "tied"


def _tune(lr, seed, metric, loss=0.5, diverged=False):
    return {"lr": lr, "seed": seed, "metric": None if diverged else metric, "eval_loss": loss, "diverged": diverged}


def test_select_lr_rule():
    """Protects the lr selection rule: the best mean validation metric over the tuning seeds wins; a tie goes to the
    lower mean validation loss, then to the smaller lr; an lr with a diverged or missing seed is not eligible."""
    lrs, seeds = [1e-4, 1e-3, 4e-3], [0, 1]
    recs = [_tune(1e-4, 0, 0.70), _tune(1e-4, 1, 0.72), _tune(1e-3, 0, 0.80), _tune(1e-3, 1, 0.78)]
    recs += [_tune(4e-3, 0, 0.90), _tune(4e-3, 1, 0.0, diverged=True)]
    choice = paired_stats.select_lr(recs, lrs, seeds)
    assert choice.lr == 1e-3 and choice.table[1e-3][0] == pytest.approx(0.79)
    tie = [_tune(1e-4, s, 0.8, loss=0.40) for s in seeds] + [_tune(1e-3, s, 0.8, loss=0.45) for s in seeds]
    assert paired_stats.select_lr(tie, lrs[:2], seeds).lr == 1e-4
    tie = [_tune(1e-3, s, 0.8, loss=0.4) for s in seeds] + [_tune(1e-4, s, 0.8, loss=0.4) for s in seeds]
    assert paired_stats.select_lr(tie, lrs[:2], seeds).lr == 1e-4
    assert paired_stats.select_lr([_tune(1e-4, 0, 0.9)], lrs, seeds).lr is None  # seed 1 missing


def test_run_id_covers_every_field_that_changes_a_result():
    """Protects resumption and pairing: every spec key but where a run is listed (groups, suite, block, lr_from) is
    in run_id — threads, test size, max_new_tokens, epochs, lr, seeds, evaluation split included."""
    block = EVIDENCE["evidence-nlg"][0]
    spec = main_specs("evidence-nlg", block, {})[0]
    for key in ("threads", "test_size", "max_new_tokens", "epochs", "lr", "seed", "init_seed", "eval_split", "r"):
        assert key in spec
    for key, value in spec.items():
        changed = {**spec, key: [value, "changed"]}
        assert (run_id(changed) == run_id(spec)) == (key in NOT_IN_RUN_ID), key
    tune = tune_specs("evidence-nlu", EVIDENCE["evidence-nlu"][0])
    assert len({run_id(s) for s in tune}) == len(tune)


def test_tuning_seeds_are_not_main_seeds_and_controls_borrow_gora_lr():
    for blocks in EVIDENCE.values():
        for block in blocks:
            assert not set(block.tune_seeds) & set(block.seeds), block.name
            specs = main_specs("x", block, {m: 1e-3 * (i + 1) for i, m in enumerate(block.tuned)})
            for spec in specs:
                source = block.source(spec["method"])
                if block.tune_seeds:
                    assert spec["lr"] == 1e-3 * (block.tuned.index(source) + 1)


# --- methods ---------------------------------------------------------------------------------------------------------


def _task(model):
    from benchmarks.harness.tasks import TaskData

    batches = cls_batches(n=2, batch=4, length=10)
    return TaskData(
        model=model,
        tokenizer=None,
        train_batches=batches,
        calib_batches=batches,
        evaluate=lambda m: {},
        metric_name="accuracy",
        model_name="tiny-bert",
        target_modules=["query", "key", "value", "dense"],
        task_type="SEQ_CLS",
        steps_per_epoch=2,
        eval_size=0,
    )


@pytest.mark.parametrize("name", ["pissa-rs", "loraga-rs", "gora-fixed"])
def test_baselines_with_rslora_start_at_the_base_function_with_rslora_scaling(name):
    """Protects the matched-scaling baselines: PiSSA and LoRA-GA move s·B·A out of W0 with the rsLoRA scaling
    s = α/√r, so the adapted model computes the base model's function at step 0. GoRA (fixed rank) does not: its B0
    is a gradient step. Every adapted layer uses s = α/√r_i (EVA's: in the evidence smoke test)."""
    import math

    batch = cls_batches(n=1, batch=4, length=10, seed=5)[0]
    base = make_bert(seed=1)
    with torch.no_grad():
        want = base(**batch).logits.clone()
    spec = {"r": 4, "num_batches": 2, "seed": 0, "init_seed": 1000, "eva_tau": 0.5, "steps": 10}
    torch.manual_seed(1000)
    model, _ = methods.build(name, _task(base), spec)
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits
    scale = float(want.abs().max())
    if name == "gora-fixed":
        assert not torch.allclose(got, want, atol=1e-4 * scale)
    else:
        torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        r = layer.r["default"]
        assert layer.scaling["default"] == pytest.approx(methods.ALPHA / math.sqrt(r))


def test_shuffled_ranks_permute_within_layers_of_one_shape():
    """Protects the random-allocation control: ranks move only among layers of the same (m, n), so the multiset of
    ranks and the parameter count Σ r·(m + n) are GoRA's; the permutation depends on the seed."""
    shapes = {f"l{i}.q": (32, 32) for i in range(6)} | {f"l{i}.up": (64, 32) for i in range(6)}
    ranks = {name: i + 1 for i, name in enumerate(sorted(shapes))}
    a = methods.shuffled_ranks(ranks, shapes, seed=1)
    b = methods.shuffled_ranks(ranks, shapes, seed=2)
    assert a != ranks and a != b and list(a) == list(ranks)
    for shape in ((32, 32), (64, 32)):
        names = [n for n in shapes if shapes[n] == shape]
        assert sorted(a[n] for n in names) == sorted(ranks[n] for n in names)
    params = lambda rk: sum(r * sum(shapes[n]) for n, r in rk.items())  # noqa: E731
    assert params(a) == params(ranks)


# --- the evidence protocol end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evidence_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evidence")
    assert run.main(["evidence-smoke", "--out", str(out)]) == 0, (out / "evidence-smoke.errors.jsonl").read_text()
    return out


def test_evidence_smoke_tunes_selects_and_runs_paired_seeds(evidence_results: Path):
    """Protects the protocol: tuning runs evaluate on the validation split, main runs on the test split at the lr
    select_lr picks from the tuning records (controls at GoRA's), and every record keeps its per-example results and
    its provenance."""
    records = run.read_records(evidence_results / "evidence-smoke.jsonl")
    base = suites.BASE["smoke-rt-sentiment"]
    for block in EVIDENCE["evidence-smoke"]:
        rs = [r for r in records if r["block"] == block.name]
        tune = [r for r in rs if r["stage"] == "tune"]
        main = [r for r in rs if r["stage"] == "main"]
        assert len(tune) == len(block.tuned) * len(block.lrs) * len(block.tune_seeds)
        assert len(main) == len(block.methods) * len(block.seeds)
        for method in block.tuned:
            choice = paired_stats.select_lr([r for r in tune if r["method"] == method], block.lrs, block.tune_seeds)
            for r in main:
                if block.source(r["method"]) == method:
                    assert r["lr"] == choice.lr, (block.name, r["method"])
        for r in rs:
            assert r["eval_split"] == ("val" if r["stage"] == "tune" else "test")
            assert len(r["correct"]) == r["eval_size"] and set(r["correct"]) <= {"0", "1"}
            assert sum(map(int, r["correct"])) / r["eval_size"] == pytest.approx(r["metric"])
            assert r["provenance"]["commit"] and r["provenance"]["command"].startswith(
                "python -m benchmarks.harness.run"
            )
            assert r["threads"] == 1 and r["init_seed"] == r["seed"] + suites.INIT_SEED_OFFSET
            if r["task"] == "smoke-rt-sentiment":
                assert r["eval_size"] == (base["val_size"] if r["stage"] == "tune" else base["test_size"])
    # matched scaling: α/√r_i for every layer of the rsLoRA-scaled methods (EVA's ranks differ by layer), α/r for LoRA
    for r in records:
        for rank, scale in r["info"]["scalings"].items():
            if r["method"] in ("rslora", "eva-rs", "pissa-rs", "loraga-rs") or r["method"].startswith("gora"):
                assert scale == pytest.approx(methods.ALPHA / int(rank) ** 0.5), (r["method"], rank)
            elif r["method"] == "lora":
                assert scale == pytest.approx(methods.ALPHA / int(rank))
    assert any(len(r["info"]["scalings"]) > 1 for r in records if r["method"] == "eva-rs")
    # paired: every method saw the same training batches for a seed (same data order), shown by equal loss at step 1
    first = {}
    for r in records:
        if r["block"] == "smoke-r4" and r["stage"] == "main" and r["method"] in ("lora", "rslora", "eva-rs"):
            first.setdefault(r["seed"], set()).add(r["loss_curve"][0][1])
    assert all(len(v) == 1 for v in first.values())
    assert (evidence_results / "evidence-smoke.lock.json").is_file()
    assert (evidence_results / "evidence-smoke.freeze.txt").read_text().strip()


def test_evidence_resume_skips_done_runs_and_refuses_another_environment(evidence_results: Path, own_repository):
    path = evidence_results / "evidence-smoke.jsonl"
    before = path.read_text()
    (own_repository / "notes.txt").write_text("an untracked file appears: not code, the resume goes on\n")
    assert run.main(["evidence-smoke", "--out", str(evidence_results), "--blocks", "smoke-nlg"]) == 0
    assert path.read_text() == before
    lock = evidence_results / "evidence-smoke.lock.json"
    saved = lock.read_text()
    fields = json.loads(saved)
    try:
        # the code is compared by content: the same files under another commit resume (records committed since)
        lock.write_text(json.dumps({**fields, "commit": "0" * 40}))
        assert run.main(["evidence-smoke", "--out", str(evidence_results), "--blocks", "smoke-nlg"]) == 0
        lock.write_text(json.dumps({**fields, "code_sha256": "0" * 64}))  # other code: refused
        assert run.main(["evidence-smoke", "--out", str(evidence_results), "--blocks", "smoke-nlg"]) == 2
        legacy = {k: v for k, v in fields.items() if k != "code_sha256"}  # a lock from before code_sha256
        lock.write_text(json.dumps(legacy))
        assert run.main(["evidence-smoke", "--out", str(evidence_results), "--blocks", "smoke-nlg"]) == 0
        lock.write_text(json.dumps({**legacy, "commit": "0" * 40}))  # compared by commit, as it was written
        assert run.main(["evidence-smoke", "--out", str(evidence_results), "--blocks", "smoke-nlg"]) == 2
    finally:
        lock.write_text(saved)
    assert run.main(["evidence-smoke", "--out", str(evidence_results), "--threads", "2", "--blocks", "smoke-nlg"]) == 2
    assert path.read_text() == before


def test_report_has_a_verdict_per_regime(evidence_results: Path, tmp_path: Path):
    doc = tmp_path / "BENCHMARKS.md"
    assert report_doc.main(["--results", str(evidence_results), "--out", str(doc)]) == 0
    text = doc.read_text()
    assert "## Suite `evidence-smoke`" in text and "### smoke-rt-sentiment, regime r2" in text
    assert "| GoRA vs its scaling baseline | `gora` − `rslora` |" in text and "McNemar" in text
    assert "### Compute" in text and "### What was cut to fit this machine" in text
    assert report_doc.main(["--results", str(evidence_results), "--out", str(doc)]) == 0
    assert doc.read_text() == text


def test_the_lock_counts_tracked_code_and_names_what_it_left_out(tmp_path: Path):
    """Protects resumption: appending results under benchmarks/results, regenerating docs, writing a log or any other
    untracked file into the checkout does not change the locked code state (else a suite would refuse to resume
    after its own runs); untracked files are named; a change to a tracked file is counted by its diff."""
    repo = _make_repository(tmp_path / "repo")
    code_keys = ("commit", "dirty", "diff_sha256")
    before = provenance.git_state(root=repo)
    assert not before["dirty"] and before["diff_sha256"] is None and before["not_counted"]["untracked"] == 0
    for name in ("benchmarks/results/_probe.jsonl", "_probe.log", "docs/_probe.md", "scratch.py", "log.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("{}\n")
    after = provenance.git_state(root=repo)
    assert {k: after[k] for k in code_keys} == {k: before[k] for k in code_keys}
    assert after["not_counted"]["untracked"] == 2
    assert sorted(after["not_counted"]["untracked_named"]) == ["log.txt", "scratch.py"]
    assert {"benchmarks/results", "docs", "**/*.log"} <= set(after["not_counted"]["paths"])
    (repo / "code.py").write_text("x = 1\n")
    one = provenance.git_state(root=repo)
    assert one["dirty"] and one["diff_sha256"] and one["commit"] == before["commit"]
    (repo / "code.py").write_text("x = 2\n")
    assert provenance.git_state(root=repo)["diff_sha256"] not in (None, one["diff_sha256"])
    _git(repo, "add", "scratch.py")  # a new file counts once it is tracked
    (repo / "code.py").write_text("x = 0\n")
    staged = provenance.git_state(root=repo)
    assert staged["dirty"] and staged["not_counted"]["untracked"] == 1
    assert staged["code_sha256"] != before["code_sha256"]


def test_the_code_hash_follows_content_not_commits(tmp_path: Path):
    """Protects resumption across commits and copies: committing results or docs changes the commit, not the code's
    hash; the same tracked files under another git history (a device's snapshot) hash the same; an uncommitted edit
    hashes like the commit that makes it; any change to tracked code changes the hash."""
    repo = _make_repository(tmp_path / "repo")
    start = provenance.git_state(root=repo)
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "suite.jsonl").write_text("{}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "records")
    committed = provenance.git_state(root=repo)
    assert committed["commit"] != start["commit"] and committed["code_sha256"] == start["code_sha256"]
    copy = _make_repository(tmp_path / "copy")  # another history, same code.py
    assert provenance.git_state(root=copy)["code_sha256"] == start["code_sha256"]
    (copy / "code.py").write_text("x = 3\n")
    edited = provenance.git_state(root=copy)
    assert edited["dirty"] and edited["code_sha256"] != start["code_sha256"]
    _git(copy, "commit", "-q", "-am", "x = 3")
    assert provenance.git_state(root=copy)["code_sha256"] == edited["code_sha256"]
    (copy / "code.py").unlink()  # a tracked file deleted in the working tree
    assert provenance.git_state(root=copy)["code_sha256"] != edited["code_sha256"]


def test_a_suite_refuses_a_library_imported_from_another_checkout(tmp_path: Path, monkeypatch, capsys):
    """Protects the lock's meaning: it hashes the harness's checkout, so `gora` must be imported from that checkout
    (a worktree of an older commit next to an editable install of the main checkout would otherwise run the main
    checkout's library under the worktree's hash); the refusal names the fix and writes nothing."""
    provenance.check_imports()  # the tests' own checkout: gora comes from its src/
    worktree = tmp_path / "worktree"
    monkeypatch.setattr(provenance, "HARNESS_CHECKOUT", worktree)
    with pytest.raises(provenance.LockError, match=f"PYTHONPATH={worktree / 'src'}"):
        provenance.check_imports()
    out = tmp_path / "out"
    assert run.main(["smoke", "--out", str(out)]) == 2
    assert "gora is imported from" in capsys.readouterr().err and not out.exists()


# --- the capacity suite (issue #19) -----------------------------------------------------------------------------------


def _sft_set(n: int = 7, seed: int = 0) -> list[dict]:
    """Encoded SFT examples of varied length: a prompt (labels -100) then an answer of 1-4 learned tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, answer = 3 + i % 4, 1 + i % 4
        ids = torch.randint(5, 60, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * prompt + ids[prompt:]})
    return out


def _pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda key, value: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])  # noqa: E731
    return {
        "input_ids": pad("input_ids", 0),
        "attention_mask": pad("attention_mask", 0),
        "labels": pad("labels", -100),
    }


def test_answer_nll_is_per_example_and_matches_the_token_mean_loss():
    """Protects the primary endpoint: each example's summed answer-token NLL does not depend on the batch it is padded
    in (batch 1 = batch 3), and Σ sums / Σ tokens is gora.app's evaluate_loss (the mean over learned tokens)."""
    from benchmarks.harness.tasks import answer_nll

    from gora.app.tasks.evaluate import evaluate_loss
    from helpers import make_llama

    model = make_llama(seed=3)
    data = _sft_set()
    sums1, counts1 = answer_nll(model, data, _pad, batch_size=1)
    sums3, counts3 = answer_nll(model, data, _pad, batch_size=3)
    assert counts1 == counts3 == [1 + i % 4 for i in range(len(data))]
    np.testing.assert_allclose(sums3, sums1, rtol=1e-4)
    want = evaluate_loss(model, data, _pad, 3)
    assert sum(sums1) / sum(counts1) == pytest.approx(want, rel=1e-4)


def _gate_record(task: str, r: int, nll: float, seed: int = 100, lr: float = 1e-3) -> dict:
    return {"gate_task": task, "r": r, "stage": "gate", "lr": lr, "seed": seed, "metric": nll, "eval_loss": nll}


def test_gate_qualifies_a_task_only_when_rank_32_is_10_percent_lower():
    """Protects the gate: NLL(r=32) <= 0.9 NLL(r=4) qualifies (0.89 yes, 0.91 no); the largest gap wins; a candidate
    with one rank missing is unfinished, never qualifying; no qualifier stops the comparison with the numbers."""
    from benchmarks.harness import capacity

    records = [
        _gate_record("spell_backward", 4, 2.0),
        _gate_record("spell_backward", 32, 1.78),  # 0.89
        _gate_record("base_conversion", 4, 1.0),
        _gate_record("base_conversion", 32, 0.91),
        _gate_record("word_sorting", 4, 1.0),
        _gate_record("word_sorting", 32, 0.5),  # 0.5: largest gap
        _gate_record("word_sequence_reversal", 4, 1.0),
    ]
    rows = {row.task: row for row in capacity.gate_rows(records, "capacity-gate-gpu")}  # all four candidates
    assert rows["spell_backward"].qualifies and not rows["base_conversion"].qualifies
    assert rows["word_sequence_reversal"].ratio is None and not rows["word_sequence_reversal"].complete
    assert capacity.qualifying(list(rows.values())).task == "word_sorting"
    # the CPU gate: word_sorting only, at its own lr (records at another lr are not its runs)
    cpu_lr = capacity_suites.GATES["capacity-gate"].lrs[0]
    cpu = [_gate_record("word_sorting", 4, 1.0, lr=cpu_lr), _gate_record("word_sorting", 32, 0.5, lr=cpu_lr)]
    blocks = capacity.comparison_blocks("evidence-capacity", cpu)
    assert [b.name for b in blocks] == ["cap-core", "cap-controls", "cap-r8"]
    core = blocks[0]
    assert core.overrides["gate_task"] == "word_sorting" and core.overrides["r"] == 4
    assert core.tuned == ("lora", "rslora", "gora") and dict(core.borrowed) == {"rslora-r32": "rslora"}
    assert len(core.seeds) >= 8 and len(core.lrs) >= 5
    assert all(b / a == 2 for a, b in zip(core.lrs, core.lrs[1:]))  # factors of 2
    with pytest.raises(capacity.StopComparison, match=r"word_sorting: r=4 –, r=32 – \[gate not finished\]"):
        capacity.comparison_blocks("evidence-capacity", records)  # the CPU gate's lr has no run there
    failing = [_gate_record("word_sorting", 4, 1.0, lr=cpu_lr), _gate_record("word_sorting", 32, 0.91, lr=cpu_lr)]
    with pytest.raises(
        capacity.StopComparison, match=r"no gate task qualifies.*word_sorting: r=4 1\.000, r=32 0\.910"
    ):
        capacity.comparison_blocks("evidence-capacity", failing)


def test_a_gate_over_several_lrs_compares_each_rank_at_its_best_lr():
    """Protects the lr check of the gate: each rank's NLL is its best over its own lr grid (r = 4 looks up from 2e-3,
    r = 32 down), the runs go grid position by grid position (every rank's first lr before any second), the report
    names each rank's best lr and every value, a record at an lr outside a rank's grid is not its run, and a gate no
    comparison reads says so."""
    from benchmarks.harness import capacity, report_capacity, report_verdict

    gate = capacity_suites.GATES["capacity-gate-long"]
    lo, hi = gate.lrs_for(4), gate.lrs_for(32)
    assert len(lo) >= 2 and len(hi) >= 2 and max(lo) > max(hi) and min(hi) < min(lo)
    specs = gate_specs("capacity-gate-long")
    assert [(s["r"], s["lr"]) for s in specs] == [(4, lo[0]), (32, hi[0]), (4, lo[1]), (32, hi[1])]
    records = [
        _gate_record("word_sorting", 4, 0.50, lr=lo[0]),
        _gate_record("word_sorting", 4, 0.44, lr=lo[1]),
        _gate_record("word_sorting", 32, 0.40, lr=hi[0]),
        _gate_record("word_sorting", 32, 0.38, lr=hi[1]),
        _gate_record("word_sorting", 32, 0.10, lr=3e-3),  # neither r = 32's grid nor a widening of it: ignored
    ]
    (row,) = capacity.gate_rows(records, "capacity-gate-long")
    assert row.nll == {4: 0.44, 32: 0.38} and row.lr == {4: lo[1], 32: hi[1]} and row.complete
    assert row.ratio == pytest.approx(0.38 / 0.44) and row.qualifies
    text = "\n".join(report_capacity.gate_section("capacity-gate-long", records))
    a, b = sorted(lo)
    assert f"r = 4 best at {lo[1]} ({a:g}: 0.500, {b:g}: 0.440)" in text
    assert f"r = 4: {a:g}, {b:g}" in text  # the header names each rank's grid
    assert "the comparison (`evidence-capacity-long`, `evidence-budget`) runs on it" in text
    (partial,) = capacity.gate_rows(records[:3], "capacity-gate-long")
    assert not partial.complete  # r = 32 has one of its two lrs

    (line,) = [
        x for x in report_verdict.headline_table({"capacity-gate-long": records[:3]}) if "capacity-gate-long" in x
    ]
    assert "(so far)" in line and "not finished" in line and "no candidate qualifies" not in line


def test_a_gate_rank_at_an_edge_of_its_lrs_widens_and_the_report_reads_the_widened_runs():
    """Protects the gate's lr protocol: a rank whose best lr sits at an edge of the lrs it has run gets twice the
    largest (half the smallest) next, at most `widen` beyond its grid on each side; once the best is inside it stops;
    the gate's verdict takes the widened runs and no lr that is not a widening of the grid."""
    from benchmarks.harness import capacity, report_capacity, report_verdict

    gate = capacity_suites.GATES["capacity-gate-long"]
    (lo_a, lo_b), (hi_a, hi_b) = gate.lrs_for(4), gate.lrs_for(32)  # r = 4 up from 2e-3, r = 32 down
    records = [
        _gate_record("word_sorting", 4, 0.46, lr=lo_a),
        _gate_record("word_sorting", 4, 0.44, lr=lo_b),  # best at the top edge
        _gate_record("word_sorting", 32, 0.60, lr=hi_a),
        _gate_record("word_sorting", 32, 0.42, lr=hi_b),  # best at the bottom edge
    ]
    assert capacity.gate_widen(gate, "word_sorting", 4, records) == 2 * max(lo_a, lo_b)
    assert capacity.gate_widen(gate, "word_sorting", 32, records) == min(hi_a, hi_b) / 2
    records += [
        _gate_record("word_sorting", 4, 0.50, lr=2 * max(lo_a, lo_b)),  # worse: r = 4's optimum is located
        _gate_record("word_sorting", 32, 0.40, lr=min(hi_a, hi_b) / 2),  # better again
    ]
    assert capacity.gate_widen(gate, "word_sorting", 4, records) is None
    assert capacity.gate_widen(gate, "word_sorting", 32, records) == min(hi_a, hi_b) / 4
    records.append(_gate_record("word_sorting", 32, 0.39, lr=min(hi_a, hi_b) / 4))
    assert capacity.gate_widen(gate, "word_sorting", 32, records) is None  # gate.widen = 2 below the grid: stop
    records.append(_gate_record("word_sorting", 32, 0.01, lr=min(hi_a, hi_b) / 8))  # beyond the widening: not read
    (row,) = capacity.gate_rows(records, "capacity-gate-long")
    assert row.nll == {4: 0.44, 32: 0.39} and row.lr == {4: max(lo_a, lo_b), 32: min(hi_a, hi_b) / 4}
    assert row.edge == (32,)  # r = 32's optimum is not located; the verdict row says so

    (line,) = [x for x in report_verdict.headline_table({"capacity-gate-long": records}) if "capacity-gate-long" in x]
    assert "qualifies: word_sorting" in line and "best lr of r = 32 at an edge" in line
    # the row names every lr each rank ran (its grid and the widening), and no lr beyond the widening
    assert (
        f"r = 32: {min(hi_a, hi_b) / 4:g}, {min(hi_a, hi_b) / 2:g}, " in line
        and f"{min(hi_a, hi_b) / 8:g}" not in line
    )
    assert f"best lr r = 4 at {max(lo_a, lo_b):g}, r = 32 at {min(hi_a, hi_b) / 4:g}" in line
    text = "\n".join(report_capacity.gate_section("capacity-gate-long", records))
    assert "r = 32 best at" in text and "at the edge of the lrs run" in text  # r = 32 still at its lowest lr
    assert text.count("at the edge of the lrs run") == 1  # r = 4's optimum is inside


def test_lr_grid_widens_at_an_edge_and_the_window_is_contiguous():
    """Protects the lr protocol: a best lr at the top (bottom) edge adds twice the largest (half the smallest), at
    most WIDEN beyond the starting grid on each side; a best inside adds nothing. The window is the contiguous run of
    lrs within 0.02 nats of the best (a second dip beyond a worse lr is not in it)."""
    from benchmarks.harness import capacity, report_capacity

    base = (1e-3, 2e-3, 4e-3)
    assert capacity.widened(list(base), 4e-3, base) == 8e-3
    assert capacity.widened(list(base), 1e-3, base) == 5e-4
    assert capacity.widened(list(base), 2e-3, base) is None
    assert capacity.widened([*base, 8e-3, 1.6e-2], 1.6e-2, base, limit=2) is None
    assert capacity.widened(list(base), None, base) is None
    curve = {1e-3: 1.50, 2e-3: 1.41, 4e-3: 1.40, 8e-3: 1.45, 1.6e-2: 1.405}
    assert report_capacity.lr_window(curve) == (2e-3, 4e-3, 1.0)
    assert capacity.center_out((1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2))[:3] == [4e-3, 2e-3, 8e-3]


def test_lr_curve_scale_keeps_the_compared_points_when_one_lr_blows_up():
    """Protects the lr-curve PNG's readability: a point above twice the panel's median (a diverging lr: 5.29 nats
    against ~0.5) sets no scale, every other point stays on it; with no such point the scale is matplotlib's."""
    from benchmarks.harness import plots

    values = [0.69, 0.64, 0.60, 0.49, 0.42, 0.71, 0.67, 0.62, 0.58, 0.49, 0.43, 5.29]
    ceiling = plots.lr_curve_ceiling(values)
    assert ceiling is not None and ceiling < 5.29
    assert all(v <= ceiling for v in values if v != 5.29)
    assert plots.lr_curve_ceiling(values[:-1]) is None
    assert plots.lr_curve_ceiling([]) is None


def test_exact_match_is_rescored_from_the_stored_answers_of_comma_separated_tasks():
    """Protects the capacity suite's secondary endpoint: a run recorded with the old scorer (every comma-separated
    answer a miss) is scored again from its stored greedy answers with reasoning-gym's own scorer: an answer equal to
    its reference is a hit; a reordered one, one with its case changed (word_sorting sorts in ASCII order) or one
    without its commas is not; a record already scored right is left as it is."""
    from benchmarks.harness import tasks

    spec = {
        "rg_tasks": ["word_sorting"],
        "rg_config": {"word_sorting": {"min_words": 3, "max_words": 5}},
        "test_size": 6,
        "eval_split": "test",
    }
    refs = [row["answer"] for row in tasks.rg_held_out(spec)[0]]
    assert len(refs) == 6 and all(", " in a for a in refs)
    predictions = [
        refs[0],
        refs[1].upper(),
        ", ".join(reversed(refs[2].split(", "))),
        None,
        refs[4].replace(",", ""),
        refs[5],
    ]
    old = {
        "spec": spec,
        "eval_split": "test",
        "predictions": predictions,
        "correct": "000000",
        "metrics": {"exact_match": 0.0},
    }
    right = {**old, "correct": "100001", "metrics": {"exact_match": 2 / 6}}
    assert tasks.rescore_exact_match([old, right]) == 1
    assert old["correct"] == right["correct"] == "100001"
    assert old["metrics"]["exact_match"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="4 predictions for 6 test problems"):
        tasks.rescore_exact_match([{**old, "predictions": predictions[:4]}])


def test_select_lr_lowest_when_lower_is_better():
    """Protects NLL-based tuning: with lower_is_better the lowest mean validation NLL wins (not the highest)."""
    recs = [_tune(1e-3, s, 1.2, loss=1.2) for s in (0, 1)] + [_tune(2e-3, s, 1.0, loss=1.0) for s in (0, 1)]
    assert paired_stats.select_lr(recs, [1e-3, 2e-3], [0, 1], lower_is_better=True).lr == 2e-3
    assert paired_stats.select_lr(recs, [1e-3, 2e-3], [0, 1]).lr == 1e-3


def _nll_record(seed: int, sums: list[float], tokens: list[int]) -> dict:
    return {"seed": seed, "nll_sum": sums, "nll_tokens": tokens}


def test_a_capacity_comparison_with_fewer_paired_seeds_than_planned_gives_no_verdict():
    """Protects the verdict table from a one-seed verdict: until a comparison has its suite's planned paired seeds,
    the headline row shows the interval without a verdict and says how many seeds ran (an interval over one seed's test
    problems omits the seed-to-seed variation); with all of them it gives the verdict."""
    from benchmarks.harness import report_verdict

    planned = len(capacity_suites.COMPARISONS["evidence-capacity-long"].main_seeds)
    tokens = [1, 3] * 50

    def records(seeds: int) -> list[dict]:
        out = []
        for method, nll in (("gora", 1.0), ("rslora", 2.0), ("lora", 2.0)):
            for s in range(seeds):
                rec = _nll_record(s, [nll + 0.01 * s, 3.0] * 50, tokens)
                out.append(
                    {
                        **rec,
                        "stage": "main",
                        "method": method,
                        "task": "rg-capacity",
                        "gate_task": "word_sorting",
                        "regime": "r4",
                    }
                )
        return out

    def row(seeds: int) -> str:
        data = {"evidence-capacity-long": records(seeds)}
        (line,) = [x for x in report_verdict.headline_table(data) if "evidence-capacity-long" in x]
        return line

    early = row(1)
    assert f"no verdict yet (1 of {planned} paired seeds" in early and "**" not in early and "better than" not in early
    assert "spans test problems, not seeds" in early  # one seed: no seed-to-seed variation in the interval at all
    some = row(3)
    assert f"no verdict yet (3 of {planned} paired seeds)" in some and "better than" not in some
    done = row(planned)
    assert "**better**" in done and "GoRA better than rsLoRA, better than LoRA" in done and "no verdict" not in done


def test_the_capacity_report_states_what_gora_allocated_from_its_runs():
    """Protects the reader of the capacity table from assuming GoRA's default ranks: the regime's line gives the
    configured r_min from the runs' spec, the smallest / largest / mean rank each run allocated, and the adapter's size
    against LoRA's at r_ref, as ranges over the seeds; a regime without GoRA runs gets no line."""
    from benchmarks.harness import report_capacity

    def run(seed: int, hi: int, mean: float, params: int) -> dict:
        info = {"ranks_min": 2, "ranks_max": hi, "ranks_mean": mean, "adapter_params": params}
        info["lora_adapter_params_at_r_ref"] = 1000
        return {"seed": seed, "r": 4, "spec": {"r": 4, "gora_min_rank": 2}, "info": info}

    line = report_capacity.allocation_line({0: run(0, 14, 4.686, 955), 1: run(1, 15, 4.662, 949)})
    assert line is not None
    assert "r_min = 2, r_ref = 4; 2 main runs" in line and "smallest rank 2, largest 14-15" in line
    assert "4.66-4.69" in line and "0.949-0.955x LoRA's at r_ref" in line
    assert report_capacity.allocation_line({}) is None
    default = run(0, 9, 8.1, 1000)
    del default["spec"]["gora_min_rank"]
    assert "GoraConfig's r_min" in report_capacity.allocation_line({0: default})


def test_the_capacity_report_shows_each_seed_and_where_training_loss_falls_behind():
    """Protects the reader of a seed-level interval from hidden structure: the per-seed table gives every method's
    test NLL / exact match on every seed (bold: the seed's lowest NLL at the budget, the r = 32 reference shown but
    not ranked; '–' where a method has not run that seed,
    'diverged' where it diverged), and the loss table gives the mean training loss over each eighth of the steps,
    averaged over seeds with the lowest and highest seed, so that a start ahead or a stall at the peak lr shows."""
    from benchmarks.harness import report_capacity

    def run(seed: int, nll: float, em: float | None, curve: list[float], diverged: bool = False) -> dict:
        return {
            "seed": seed,
            "metric": nll,
            "metrics": {} if em is None else {"exact_match": em},
            "loss_curve": [[i + 1, v] for i, v in enumerate(curve)],
            "diverged": diverged,
        }

    flat = [1.0] * 16
    methods = {
        "gora": {0: run(0, 0.4, 0.25, [2.0] * 2 + [1.0] * 14), 1: run(1, 0.6, None, [4.0] * 2 + [1.0] * 14)},
        "lora": {0: run(0, 0.5, 0.125, flat), 1: run(1, 0.5, 0.5, flat), 2: run(2, 0.7, 0.0, flat)},
        "rslora": {0: run(0, 9.0, 0.0, [*flat[:3], None], diverged=True)},
    }
    seeds = report_capacity.seed_table(methods)
    assert seeds[0] == "| seed | `lora` | `rslora` | `gora` |"  # the report's method order, not the dict's
    assert seeds[2] == "| 0 | 0.500 / 12.5 | diverged | **0.400 / 25.0** |"
    assert seeds[3] == "| 1 | **0.500 / 50.0** | – | 0.600 / – |"
    assert seeds[4] == "| 2 | 0.700 / 0.0 | – | – |"  # a lone run is nobody's best

    methods["rslora-r32"] = {0: run(0, 0.1, 0.75, flat), 1: run(1, 0.2, 0.5, flat)}  # the reference is not ranked
    with_ref = report_capacity.seed_table(methods)
    assert with_ref[2] == "| 0 | 0.500 / 12.5 | diverged | **0.400 / 25.0** | 0.100 / 75.0 |"
    assert with_ref[3] == "| 1 | **0.500 / 50.0** | – | 0.600 / – | 0.200 / 50.0 |"
    del methods["rslora"], methods["rslora-r32"]
    phases = report_capacity.loss_phase_table(methods)
    assert phases[0].startswith("| method | seeds | steps 1–2 | steps 3–4 |") and phases[0].endswith("steps 15–16 |")
    gora = phases[3].split(" | ")
    assert gora[:3] == ["| `gora`", "2", "3.00 (2.00–4.00)"]  # first eighth: seeds at 2.0 and 4.0
    assert gora[3] == "1.00 (1.00–1.00)"
    assert phases[2].startswith("| `lora` | 3 | 1.00 (1.00–1.00) |")
    assert report_capacity.loss_phase_table({"lora": {0: run(0, 0.5, 0.1, [1.0] * 4)}}) == []  # fewer steps than spans


def test_paired_nll_weights_examples_by_answer_tokens_and_lower_is_better():
    """Protects the NLL verdict: the difference is Σ ΔNLL / Σ tokens (token-weighted, not the mean of per-example
    means), a lower NLL for A is 'better', and the r → 32 gap fraction is (ref − A) / (ref − top), labelled with its
    seeds when the reference has run fewer than the method."""
    from benchmarks.harness import report_capacity

    tokens = [1, 3] * 50
    a = {s: _nll_record(s, [1.0, 3.0] * 50, tokens) for s in range(4)}  # 1.0 nats per token
    b = {s: _nll_record(s, [2.0, 3.0] * 50, tokens) for s in range(4)}  # (2 + 3) / 4 = 1.25 per token
    st = report_capacity.paired_nll(a, b)
    assert st["mean"] == pytest.approx(-0.25) and st["verdict"] == "better" and st["wins"] == 4
    assert report_capacity.paired_nll(b, a)["verdict"] == "worse"
    top = {s: _nll_record(s, [0.0, 3.0] * 50, tokens) for s in range(4)}  # 0.75 per token
    gap = report_capacity.gap_closed(a, b, top)
    assert gap["value"] == pytest.approx(0.5) and gap["low"] <= 0.5 <= gap["high"]
    assert report_capacity.gap_cell(gap, 4) == "0.50 [0.50, 0.50]" and report_capacity.gap_cell(None, 4) == "–"
    part = report_capacity.gap_closed(a, b, {s: top[s] for s in (0, 2)})  # the reference has run 2 of the 4 seeds
    assert part["seeds"] == [0, 2] and part["value"] == pytest.approx(0.5)
    assert report_capacity.gap_cell(part, 4) == "0.50 [0.50, 0.50] (seeds 0, 2)"


def test_pooled_bootstrap_resamples_seeds_within_each_budget():
    """Protects the pooled verdict: with strata every replicate keeps each budget's number of seeds, so a budget at
    +1 and one at −1 pool to exactly 0 (without strata the replicates wander)."""
    d = np.vstack([np.ones((4, 50)), -np.ones((4, 50))])
    mean, low, high = paired_stats.paired_bootstrap(d, n_boot=500, strata=[0] * 4 + [1] * 4)
    assert mean == low == high == 0.0
    _, low, high = paired_stats.paired_bootstrap(d, n_boot=500)
    assert low < -0.2 and high > 0.2
    with pytest.raises(ValueError, match="strata has 3 labels for 8 rows"):
        paired_stats.paired_bootstrap(d, strata=[0, 1, 2])


def test_adalora_is_evaluated_on_cross_entropy_only():
    """Protects AdaLoRA's comparability: PEFT adds orth_reg_weight × its orthogonality regulariser to `.loss` even
    in eval mode; inside `cross_entropy_only` the loss is the cross-entropy of the logits, and the weight is back
    afterwards."""
    from benchmarks.harness.worker import cross_entropy_only

    from helpers import make_bert

    batch = cls_batches(n=1, batch=4, length=10, seed=2)[0]
    spec = {"r": 4, "num_batches": 1, "seed": 0, "steps": 20}
    model, _ = methods.build("adalora", _task(make_bert(seed=1)), spec)
    model.eval()
    with torch.no_grad():
        with_reg = float(model(**batch).loss)
        with cross_entropy_only(model, "adalora"):
            out = model(**batch)
        ce = float(torch.nn.functional.cross_entropy(out.logits, batch["labels"]))
    assert float(out.loss) == pytest.approx(ce, rel=1e-5)
    assert with_reg > ce * (1 + 1e-3)
    assert next(iter(model.peft_config.values())).orth_reg_weight > 0


def test_device_cuda_without_a_gpu_is_refused_by_name():
    """Protects --device cuda: on a machine without CUDA the run fails at once with what to do, not on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from benchmarks.harness.worker import on_device

    with pytest.raises(RuntimeError, match="device='cuda' but torch sees no CUDA device"):
        on_device(_task(make_bert()), {"device": "cuda"})


@pytest.fixture(scope="module")
def gpu_command_dry_run(tmp_path_factory) -> Path:
    """The prepared GPU command (scripts/gpu_capacity.sh) run on the CPU on the smoke suites."""
    import os
    import subprocess

    out = tmp_path_factory.mktemp("capacity")
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "GATE": "capacity-gate-smoke",
        "COMPARE": "evidence-capacity-smoke",
        "OUT": str(out),
        "JOBS": "1",
        "DOC": str(out / "BENCHMARKS.md"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_capacity.sh")], env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_gpu_command_runs_gate_comparison_and_report_on_the_cpu(gpu_command_dry_run: Path):
    """Protects the prepared GPU run: one command runs the gate, the comparison on the task the gate picked (tuning,
    main seeds with per-example NLL and exact match, the r = 32 reference at rsLoRA's lr), and the report (verdict
    table first, lr-curve PNG); a gate rank whose best lr sits at an edge of its grid gets the next lr out."""
    from benchmarks.harness import capacity

    out = gpu_command_dry_run
    gate = run.read_records(out / "capacity-gate-smoke.jsonl")
    assert {(r["gate_task"], r["r"]) for r in gate} == {
        (t, r) for t in ("spell_backward", "base_conversion") for r in (4, 32)
    }
    for task in capacity_suites.GATES[
        "capacity-gate-smoke"
    ].tasks:  # r = 4 ran 5e-3 and 1e-2, then one lr past the better
        nll = {r["lr"]: r["metric"] for r in gate if r["gate_task"] == task and r["r"] == 4}
        past = 2e-2 if nll[1e-2] < nll[5e-3] else 2.5e-3
        assert sorted(nll) == sorted([5e-3, 1e-2, past]), (task, nll)
        (row,) = [row for row in capacity.gate_rows(gate, "capacity-gate-smoke", 1.0) if row.task == task]
        assert row.nll[4] == min(nll.values())  # the widened run counts
    comp = run.read_records(out / "evidence-capacity-smoke.jsonl")
    main = [r for r in comp if r["stage"] == "main"]
    assert main and all(r["eval_split"] == "test" and len(r["nll_sum"]) == r["eval_size"] for r in main)
    assert all(len(r["correct"]) == r["eval_size"] and r["metric_name"] == "answer_nll" for r in main)
    core = {(r["method"], r["seed"]): r for r in main if r["block"] == "cap-core"}
    for seed in capacity_suites.COMPARISONS["evidence-capacity-smoke"].main_seeds:
        assert {"lora", "rslora", "gora", "rslora-r32"} <= {m for m, s in core if s == seed}
        assert core[("rslora-r32", seed)]["lr"] == core[("rslora", seed)]["lr"]
        assert core[("rslora-r32", seed)]["adapter_params"] == 8 * core[("rslora", seed)]["adapter_params"]
    tune = [r for r in comp if r["stage"] == "tune"]
    assert {r["method"] for r in tune} >= {"lora", "rslora", "gora", "gora-auto"}
    assert all(r["eval_split"] == "val" for r in tune)
    doc = (out / "BENCHMARKS.md").read_text()
    assert doc.index("## Verdict") < doc.index("## Suite `capacity-gate-smoke`")
    assert "(`evidence-capacity-smoke`" in doc and (out / "img" / "evidence-capacity-smoke-lr-curves.png").is_file()


def test_gpu_command_skips_the_gate_when_told_and_reads_its_records(gpu_command_dry_run: Path):
    """Protects GATE= (a device session reusing gate records run under older code): the gate step is skipped, so its
    lock is not checked, and the comparison still finds its task in the gate's records; with the gate step the same
    folder is refused."""
    import os
    import subprocess

    out = gpu_command_dry_run
    lock = out / "capacity-gate-smoke.lock.json"
    saved = lock.read_text()
    before = (out / "evidence-capacity-smoke.jsonl").read_text()
    lock.write_text(json.dumps({**json.loads(saved), "code_sha256": "0" * 64}))  # the gate ran under other code
    try:
        env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "COMPARE": "evidence-capacity-smoke"}
        env |= {"OUT": str(out), "JOBS": "1", "DOC": str(out / "BENCHMARKS.md"), "OMP_NUM_THREADS": "1"}
        script = ["bash", str(ROOT / "scripts" / "gpu_capacity.sh")]
        skip = subprocess.run(script, env={**env, "GATE": ""}, capture_output=True, text=True, timeout=600)
        assert skip.returncode == 0, skip.stderr[-3000:]
        assert "gate done" not in skip.stdout and "comparison finished with status 0" in skip.stdout
        assert (out / "evidence-capacity-smoke.jsonl").read_text() == before  # every run was done: none added
        gate = subprocess.run(
            script, env={**env, "GATE": "capacity-gate-smoke"}, capture_output=True, text=True, timeout=600
        )
        assert gate.returncode == 2 and "another code version" in gate.stderr
    finally:
        lock.write_text(saved)


def test_the_report_blames_other_work_only_when_the_load_exceeds_the_suites_own():
    """Protects the compute lines' honesty: a load about the suite's own runs × threads is not 'other work'; a load
    above it is."""
    from benchmarks.harness import report_evidence

    def records(load: float, jobs: int) -> list[dict]:
        prov = {"commit": "c" * 40, "dirty": False, "command": f"python -m benchmarks.harness.run s --jobs {jobs}"}
        return [
            {
                "provenance": prov,
                "versions": {"torch": "x"},
                "threads": 1,
                "machine": {"load_avg_1m": load},
                "date": "d",
            }
        ]

    assert "no other work of note" in report_evidence.provenance_lines(records(2.1, 2))[-1]
    assert "other work shared the machine" in report_evidence.provenance_lines(records(4.0, 2))[-1]
    no_jobs = [{**records(2.0, 1)[0], "provenance": {"command": "python -m benchmarks.harness.run s"}}]
    assert "ran 1 at a time (other work shared" in report_evidence.provenance_lines(no_jobs)[-1]  # default: 1

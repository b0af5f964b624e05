"""Large models never whole on a rank, and resume at scale (issue 25, items 3-4), on 2 CPU
processes under DeepSpeed (training.strategies.CPUDeepSpeedStrategy): ZeRO-3 construction in
``configure_model``, the consolidation command, a LoRA checkpoint without the frozen base, and
the same MLflow run after a SIGKILL and a requeue."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
import test_generator_task as generator_tests
from test_generator_task import BASE, REPO, _run_cli

gen_shards, codec_dir = generator_tests.gen_shards, generator_tests.codec_dir     # their module-scoped fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STRATEGY = REPO / "configs" / "train" / "strategy" / "deepspeed_cpu.yaml"
#: a mid-size generator: 6 layers of width 512 (≈ 26 M parameters, ≈ 105 MB in fp32)
MID = {"num_heads": 8, "head_dim": 64, "ffn_dim": 2048, "num_layers": 6}


def scale_config(tmp: Path, shards: Path, codec: Path, steps: int, model: dict | None = None,
                 callbacks: list | None = None, strategy: dict | None = None, every: int = 1) -> Path:
    """A --config for the scale runs: tiny windows, a checkpoint every ``every`` steps, no EMA
    or sample videos unless ``callbacks`` adds them."""
    cbs = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": None, "filename": "step{step:04d}", "auto_insert_metric_name": False,
                          "every_n_train_steps": every, "save_last": True, "save_top_k": 2, "monitor": "step",
                          "mode": "max"}}, *(callbacks or [])]
    cfg = {"trainer": {"max_steps": steps, "enable_progress_bar": False, "log_every_n_steps": 1,
                       "check_val_every_n_epoch": 1000, "callbacks": cbs},
           "model": {"init_args": {"codec": str(codec), "frames": 5, "frame_stride": 1, "warmup_steps": 1,
                                   **(model or {})}},
           "data": {"init_args": {"root": str(shards), "batch_size": 1, "samples_per_epoch": 4, "val_samples": 1,
                                  "shuffle_buffer": 2}}}
    if strategy:
        cfg["trainer"]["strategy"] = {"class_path": "training.strategies.CPUDeepSpeedStrategy", "init_args": strategy}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "scale_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_zero3_builds_the_model_partitioned_and_consolidates(gen_shards, codec_dir, tmp_path, monkeypatch):
    """2 processes, ZeRO-3, a mid-size flavor: after setup each rank holds about half of the
    parameter bytes, and building the model grew its memory by less than the whole model
    (ZeRO-3 partitions each layer as ``configure_model`` creates it); the sharded checkpoint
    folder consolidates into a ``NormalDrivenWan`` export with one command."""
    from models.generator import NormalDrivenWan
    from training.export import main as export_main
    # freed tensors go back to the OS at once (glibc keeps freed heap chunks resident otherwise, and the
    # resident memory would count a partitioned layer's full copy that is already gone)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    probe = [{"class_path": "scale_probes.ConstructionMemory", "init_args": {"folder": str(tmp_path / "mem")}}]
    cfg = scale_config(tmp_path, gen_shards, codec_dir, 1, {"flavor_overrides": MID}, probe, {"stage": 3})
    out = tmp_path / "run"
    r = _run_cli(["fit", "--config", str(BASE), "--config", str(STRATEGY), "--config", str(cfg), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / "mem" / f"rank{k}.json").read_text()) for k in range(2)]
    whole = ranks[0]["model_param_bytes"]
    assert whole > 80e6                                                  # the mid-size model, fp32
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["model_param_bytes"] == whole
        assert abs(rank["local_param_bytes"] - whole / 2) < 0.02 * whole, rank
        growth = rank["peak_after_build"] - rank["rss_before_build"]
        assert growth < 0.75 * whole, (growth, whole)                     # never the whole model at once
    # the documented consolidation: the sharded folder -> a save_pretrained export (live weights: no EMA)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in (ckpt / "checkpoint").glob("*optim_states.pt")).__len__() == 2   # one shard a rank
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "export"), "--no-ema"]) == 0
    model = NormalDrivenWan.from_pretrained(tmp_path / "export")
    assert sum(p.numel() * 4 for p in model.parameters()) == whole
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("transformer.blocks.0.attn1"))


@pytest.mark.extended
@pytest.mark.slow
def test_a_killed_then_requeued_run_continues_its_mlflow_run(gen_shards, codec_dir, tmp_path):
    """SIGKILL at step 3 (the step-2 checkpoint written), then the requeue (`--ckpt_path last`):
    one MLflow run, ended FINISHED, whose loss history runs from step 0 to the last step."""
    import mlflow
    lr_monitor = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}
    kill = [{"class_path": "train_probes.KillAtStep", "init_args": {"step": 3}}, lr_monitor]
    out = tmp_path / "run"
    # the learning-rate rule: lr 0.004 is for a global batch of 4; this one is 1 (1 sample, 1 process) -> 0.002
    rule = {"lr": 0.004, "lr_reference_batch": 4, "lr_scaling": "sqrt"}
    killed = scale_config(tmp_path / "killed", gen_shards, codec_dir, 5, rule, callbacks=kill, every=2)
    resumed = scale_config(tmp_path / "resumed", gen_shards, codec_dir, 5, rule, callbacks=[lr_monitor], every=2)
    r = _run_cli(["fit", "--config", str(BASE), "--config", str(killed), "--out", str(out)])
    assert r.returncode != 0
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generator").experiment_id
    [run] = client.search_runs([experiment])
    assert run.info.status == "RUNNING"                                 # killed: nobody ended it
    r = _run_cli(["fit", "--config", str(BASE), "--config", str(resumed), "--out", str(out), "--ckpt_path", "last"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["run_id"] == run.info.run_id
    runs = client.search_runs([experiment])
    assert [x.info.run_id for x in runs] == [run.info.run_id]           # no second run
    assert runs[0].info.status == "FINISHED"
    lr = sorted(client.get_metric_history(run.info.run_id, "lr-AdamW"), key=lambda m: m.step)
    assert lr[0].step == 0 and abs(lr[0].value - 0.002) < 1e-9, lr[0]
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps[0] <= 1 and steps[-1] >= 4 and set(range(steps[0], 5)) <= set(steps), steps
    # a fresh fit (no --ckpt_path) in the same folder opens a new run
    r = _run_cli(["fit", "--config", str(BASE), "--config", str(resumed), "--out", str(out),
                  "--trainer.max_steps", "1"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(client.search_runs([experiment])) == 2


def test_geometry_stays_fp32_under_bf16():
    """The strategies' DeepSpeed precision plugin casts the batch to bf16 except the task's
    geometry (``GeneratorTask.fp32_batch_keys``): a 700 px focal length keeps its sub-pixel part."""
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    from training.strategies import CPUDeepSpeedStrategy, DeepSpeedStrategy, GeometryFp32Precision
    from training.tasks.generator import GeneratorTask
    for cls in (CPUDeepSpeedStrategy, DeepSpeedStrategy):
        strategy = cls(stage=2)
        strategy.precision_plugin = DeepSpeedPrecision("bf16-mixed")          # what the Trainer assigns
        assert isinstance(strategy.precision_plugin, GeometryFp32Precision)
    plugin = GeometryFp32Precision("bf16-mixed", keep_fp32=GeneratorTask.fp32_batch_keys)
    focal = torch.tensor([[700.3, 0.0, 255.7]])
    batch = {"frames": torch.zeros(1, 5, 16, 16, 3, dtype=torch.uint8), "latents": torch.randn(1, 16, 2, 2, 2),
             "smplx": {"camera_K": focal.clone(), "expression": torch.randn(5, 10)},
             "static_offsets": torch.randn(1, 30, 3)}
    out = plugin.convert_input(batch)
    assert out["latents"].dtype == torch.bfloat16 and out["frames"].dtype == torch.uint8
    assert out["smplx"]["camera_K"].dtype == torch.float32 and torch.equal(out["smplx"]["camera_K"], focal)
    assert out["static_offsets"].dtype == torch.float32
    assert float(focal.bfloat16()[0, 0]) != float(focal[0, 0])                # what bf16 would have done


def test_learning_rate_rule_for_another_global_batch():
    from training.tasks.generator import scaled_lr
    assert scaled_lr(1e-4, 32, 8, "sqrt") == pytest.approx(2e-4)            # 1 node -> 4 nodes
    assert scaled_lr(1e-4, 32, 8, "linear") == pytest.approx(4e-4)
    assert scaled_lr(1e-4, 32, None) == scaled_lr(1e-4, 32, 8, "none") == 1e-4
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(1e-4, 32, 8, "cubic")
    for name in ("dit_wan1.3b_zero2.yaml", "dit_wan14b_lora_zero2.yaml"):    # the GPU configs state the rule
        init = yaml.safe_load((REPO / "configs" / "train" / name).read_text())["model"]["init_args"]
        assert init["lr_reference_batch"] == 8 and init["lr_scaling"] == "sqrt"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapters_not_the_frozen_base(gen_shards, codec_dir, tmp_path):
    """LoRA from a Wan folder under ZeRO-2 with ``exclude_frozen_parameters`` (the wan14b_lora
    recipe's setting, at a mid size): the checkpoint folder is the trainable parameters with their
    fp32 Adam state (16 bytes each), not the frozen base; the export rebuilds the base from the
    Wan folder and takes the trained adapters from the checkpoint."""
    from diffusers import WanTransformer3DModel

    from models.generator.flavors import flavor
    from training.export import task_from_checkpoint
    torch.manual_seed(0)
    base = WanTransformer3DModel(**flavor("tiny_z16", **MID).transformer_config())
    base.save_pretrained(tmp_path / "wan" / "transformer")
    base_bytes = sum(p.numel() * 4 for p in base.parameters())
    model = {"flavor_overrides": {**MID, "lora_rank": 4}, "wan_folder": str(tmp_path / "wan"), "lr": 1e-3}
    cfg = scale_config(tmp_path, gen_shards, codec_dir, 1, model,
                       strategy={"stage": 2, "exclude_frozen_parameters": True})
    out = tmp_path / "run"
    r = _run_cli(["fit", "--config", str(BASE), "--config", str(STRATEGY), "--config", str(cfg), "--out", str(out),
                  "--trainer.devices", "1"])
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = out / "checkpoints" / "last.ckpt"
    task, _ = task_from_checkpoint(ckpt, use_ema=False)
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    size = folder_bytes(ckpt / "checkpoint")
    assert size < 0.3 * base_bytes, (size, base_bytes)                       # not the base
    assert 16 * trainable < size < 16 * trainable * 1.3 + 2e6, (size, trainable)
    params = dict(task.model.transformer.named_parameters())
    assert torch.equal(params["blocks.0.attn1.to_q.base_layer.weight"], base.blocks[0].attn1.to_q.weight)
    assert params["blocks.0.attn1.to_q.lora_B.default.weight"].abs().sum() > 0     # trained (starts at 0)


@pytest.mark.extended
@pytest.mark.slow
def test_ema_under_zero3_is_refused_before_the_model_is_built(gen_shards, codec_dir, tmp_path):
    cfg = scale_config(tmp_path, gen_shards, codec_dir, 1, strategy={"stage": 3},
                       callbacks=[{"class_path": "training.callbacks.EMA", "init_args": {"decay": 0.9}}])
    r = _run_cli(["fit", "--config", str(BASE), "--config", str(STRATEGY), "--config", str(cfg),
                  "--out", str(tmp_path / "run"), "--trainer.devices", "1"])
    assert r.returncode == 2, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["error"] == "UserError" and "ZeRO-3" in line["message"] and "--no-ema" in line["message"]


def test_a_continued_run_keeps_its_params_and_tags_changed_ones(tmp_path):
    """Resuming with a changed hyperparameter (MLflow params are immutable) does not fail: the
    new value is a ``resumed_param.<name>`` tag; the run is reopened RUNNING, then FINISHED."""
    from training.logging import LocalMLFlowLogger
    first = LocalMLFlowLogger(out_dir=str(tmp_path), experiment_name="e")
    first.log_hyperparams({"lr": 0.1, "seed": 0})
    run_id = first.run_id                                                 # killed: never finalized
    again = LocalMLFlowLogger(out_dir=str(tmp_path), experiment_name="e", continue_run=True)
    assert again.run_id == run_id
    again.log_hyperparams({"lr": 0.05, "seed": 0, "new": 1})
    run = again.experiment.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"lr": "0.1", "seed": "0", "new": "1"} and run.data.tags["resumed_param.lr"] == "0.05"
    again.finalize("success")
    assert again.experiment.get_run(run_id).info.status == "FINISHED"
    other = LocalMLFlowLogger(out_dir=str(tmp_path), experiment_name="other", continue_run=True)
    assert other.run_id != run_id                                         # another experiment: a new run


TRANSFER = REPO / "configs" / "train" / "transfer_tiny.yaml"


def transfer_config(tmp: Path, shards: Path, steps: int, probe: Path) -> Path:
    """A --config for the world-size runs: the tiny transfer task, a checkpoint every 2 steps,
    the optimizer state written at the start and the end (train_probes.OptimizerState)."""
    cbs = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": None, "filename": "step{step:04d}", "auto_insert_metric_name": False,
                          "every_n_train_steps": 2, "save_last": True, "save_top_k": 2, "monitor": "step",
                          "mode": "max"}},
           {"class_path": "train_probes.OptimizerState", "init_args": {"folder": str(probe)}}]
    cfg = {"trainer": {"max_steps": steps, "max_epochs": -1, "enable_progress_bar": False, "log_every_n_steps": 1,
                       "check_val_every_n_epoch": 1000, "callbacks": cbs},
           "model": {"init_args": {"vertex_samples": 512, "warmup_steps": 1}},
           "data": {"init_args": {"root": str(shards), "batch_size": 2, "samples_per_epoch": 24, "val_samples": 2,
                                  "shuffle_buffer": 4}}}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "world_run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_a_zero2_run_resumes_on_one_process_and_back_on_two(truth_shards, tmp_path):
    """ZeRO-2 on 2 processes for 4 steps; its checkpoint made universal
    (``python -m training.checkpoints to-universal``) resumes on 1 process to step 6, and that
    one's, made universal, on 2 processes to step 8. After each load the fp32 master weights and
    Adam moments are those saved; the loss goes on from where it was; the data position is the
    samples consumed globally (24 an epoch: 12 a rank on 2 processes, 24 on 1)."""
    import mlflow
    from safetensors import safe_open
    from safetensors.torch import load_file

    from training.checkpoints import main as checkpoints
    from training.export import load_checkpoint_state
    legs = (("two", 2, 4, None), ("one", 1, 6, "two"), ("again", 2, 8, "one"))
    for name, devices, steps, source in legs:
        cfg = transfer_config(tmp_path / f"cfg_{name}", truth_shards, steps, tmp_path / f"opt_{name}")
        args = ["fit", "--config", str(TRANSFER), "--config", str(STRATEGY), "--config", str(cfg),
                "--out", str(tmp_path / name), "--trainer.devices", str(devices)]
        if source:
            universal = tmp_path / f"{source}.universal"
            saved = tmp_path / source / "checkpoints" / "last.ckpt"
            assert checkpoints(["to-universal", str(saved), str(universal)]) == 0
            args += ["--ckpt_path", str(universal)]
        r = _run_cli(args)
        assert r.returncode == 0, r.stderr[-4000:]
    for saved, loaded, step in (("two", "one", "4"), ("one", "again", "6")):
        before, after = load_file(str(tmp_path / f"opt_{saved}" / "end.safetensors")), \
            load_file(str(tmp_path / f"opt_{loaded}" / "start.safetensors"))
        assert before.keys() == after.keys() and len(before) == 3 * len([k for k in before if k.endswith("/fp32")])
        for key in before:
            assert torch.equal(before[key], after[key]), key                    # same optimizer state
        with safe_open(str(tmp_path / f"opt_{saved}" / "end.safetensors"), "pt") as f:
            saved_meta = f.metadata()
        with safe_open(str(tmp_path / f"opt_{loaded}" / "start.safetensors"), "pt") as f:
            assert f.metadata()["step"] == saved_meta["step"] == step
            assert f.metadata()["fixed_loss"] == saved_meta["fixed_loss"]     # the loss goes on from there
    positions = {name: load_checkpoint_state(tmp_path / name / "checkpoints" / "last.ckpt")["ShardDataModule"]
                 for name, *_ in legs}
    # an epoch of 24 samples: 2 x 4 batches of 2 (16); on 1 process 8 of 12 batches done, 2 more (20);
    # on 2 processes 5 of 6 batches a rank done, 1 more ends the epoch, then 1 of the next
    assert [(p["epoch"], p["consumed"], p["world_size"]) for p in positions.values()] == \
        [(0, 4, 2), (0, 10, 1), (1, 1, 2)]
    losses = {}
    for name, *_ in legs:
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        [run] = client.search_runs([client.get_experiment_by_name("transfer").experiment_id])
        losses[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss_mm2")}
    assert [sorted(losses[name]) for name, *_ in legs] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    fixed = {}
    for name, *_ in legs:
        for when in ("start", "end"):
            with safe_open(str(tmp_path / f"opt_{name}" / f"{when}.safetensors"), "pt") as f:
                fixed[name, when] = float(f.metadata()["fixed_loss"])
    assert all(fixed[name, "end"] != fixed[name, "start"] for name, *_ in legs)      # each leg trained


def test_to_universal_refuses_a_folder_that_is_not_a_deepspeed_checkpoint(tmp_path, capsys):
    from training.checkpoints import main as checkpoints
    (tmp_path / "plain.ckpt").mkdir()
    assert checkpoints(["to-universal", str(tmp_path / "plain.ckpt"), str(tmp_path / "out")]) == 2
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["error"] == "UserError" and "not a DeepSpeed checkpoint" in line["message"]
    assert not (tmp_path / "out").exists()

"""The starting points the project ships (``training/pretrained``): written from a generator
export and its codec (fp16), read back whole, and the shipped ``tiny_cpu`` one loads as the
demo fine-tunes from it."""
from __future__ import annotations

import json

import pytest
import torch

from training.export import SHIPPED_INITS, read_init_folder, write_init_folder


def test_an_init_folder_round_trips_at_half_the_bytes(tmp_path):
    from models.generator import LatentCodec, NormalDrivenWan
    torch.manual_seed(0)
    model = NormalDrivenWan("tiny_z16")
    model.save_pretrained(tmp_path / "export")
    LatentCodec.tiny(seed=0, base_dim=8).save_pretrained(tmp_path / "codec")
    init = write_init_folder(tmp_path / "export", tmp_path / "codec", tmp_path / "init", {"what": "test", "steps": 3})
    assert init.provenance == {"what": "test", "steps": 3}
    full = sum(p.stat().st_size for p in (tmp_path / "export").rglob("*.safetensors"))
    half = sum(p.stat().st_size for p in init.generator.rglob("*.safetensors"))
    assert half < 0.6 * full
    back = NormalDrivenWan.from_pretrained(init.generator)               # loaders cast back to fp32
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert b.dtype == torch.float32, name
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)
    LatentCodec.from_pretrained(init.codec)
    (init.root / "provenance.json").unlink()
    with pytest.raises(FileNotFoundError, match="provenance.json"):
        read_init_folder(init.root)
    # a folder that is not an init folder is never replaced
    with pytest.raises(ValueError, match="not an init folder"):
        write_init_folder(tmp_path / "export", tmp_path / "codec", tmp_path / "codec", {"what": "test"})
    assert (tmp_path / "codec" / "config.json").is_file()


def test_ship_into_a_folder_that_is_not_an_init_folder_is_exit_2_before_the_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "keep.txt").write_text("mine")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "generator.py"), "--ship", str(tmp_path),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["ship"] == str(tmp_path) and "not an init folder" in line["message"]
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path / "work").exists()


def test_the_shipped_tiny_cpu_start_loads_and_says_how_it_was_made():
    """What ``expportrait demo`` fine-tunes from: the tiny_cpu recipe's generator and codec,
    trained on identities of another world seed than the demo's (0), with the command that made it."""
    from expportrait.commands.demo import INIT
    from expportrait.recipes import load_recipe
    from models.generator import LatentCodec, NormalDrivenWan
    init = read_init_folder(INIT)
    assert init.root == SHIPPED_INITS / INIT
    prov = init.provenance
    assert prov["world"]["seed"] != 0 and "--ship" in prov["command"] and prov["train_samples"] > 0
    assert prov["recipe"] == "tiny_cpu" and "held_out" in prov
    model = NormalDrivenWan.from_pretrained(init.generator)
    assert model.flavor_name == load_recipe("tiny_cpu").generator_init()["flavor"]
    LatentCodec.from_pretrained(init.codec)
    assert sum(p.stat().st_size for p in init.root.rglob("*")) < 10e6          # a few MB in git
    json.dumps(prov)

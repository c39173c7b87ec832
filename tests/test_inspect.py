"""Per-layer tables, heatmaps, projections and the HTML report (rendered in headless Chromium when present)."""

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from are_lens import Concept, Edit, edit, inspect
from are_lens.ablation import save_ablation
from are_lens.cli import main
from are_lens.report import write_report
from conftest import sentences

FAST = dict(rounds=2, steps_per_round=4, reply_tokens=2, d_epochs=5, progress=False)
PNG = b"\x89PNG\r\n\x1a\n"
ABLATION = [
    {"layer": "full", "fresh_d_accuracy": 0.6, "projection": 0.9, "cosine": 0.99, "mean_gap_left": 0.1},
    {"layer": "none", "fresh_d_accuracy": 1.0, "projection": 0.0, "cosine": 0.0, "mean_gap_left": 1.0},
    {"layer": "blocks.1.hook_resid_post", "hooks": ["blocks.1.hook_resid_post"], "fresh_d_accuracy_without": 0.9,
     "fresh_d_accuracy_only": 0.7, "projection_without": 0.2, "projection_only": 0.8},
]


@pytest.fixture(scope="module")
def trained(random_bridge):
    concept = Concept(sentences("sad", 16), sentences("happy", 16), name="sad → happy")
    return edit(random_bridge, concept, at=[0, 1], read=[1, 2], **FAST)


def is_png(path):
    return Path(path).read_bytes()[:8] == PNG and Path(path).stat().st_size > 2000


def test_layers_reads_the_history(trained):
    rows = trained.layers()
    assert [r["hook"] for r in rows] == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert [(r["adapter"], r["read"]) for r in rows] == [(True, False), (True, True), (False, True)]
    last = trained.history[-1]
    for row in rows:
        if row["adapter"]:
            assert row["weight_norm"] == last["adapters"][row["hook"]]["weight_norm"] > 0
            assert row["relative_delta_norm"] == last["adapters"][row["hook"]]["relative_delta_norm"]
        else:
            assert row["weight_norm"] is None
        if row["read"]:
            assert row["probe_accuracy_base"] == trained.history[0]["probe_accuracy"][row["hook"]]
            assert 0.0 <= row["probe_accuracy"] <= 1.0
    assert Edit([]).layers() == []


def test_layer_grid_is_hook_by_round(trained):
    hooks, rounds, grid = inspect.layer_grid(trained.history, "adapters", "relative_delta_norm")
    assert hooks == trained.hooks and rounds == [0, 1, 2] and grid.shape == (2, 3)
    assert torch.all(grid[:, 0] == 0)  # round 0 measures the untrained (zero-initialised) adapters
    hooks, _, grid = inspect.layer_grid(trained.history, "probe_accuracy")
    assert hooks == trained.config["read"] and bool(((grid >= 0) & (grid <= 1)).all())


def test_heatmap_and_projection_pictures(tmp_path, trained):
    assert is_png(inspect.plot_layers(trained.history, tmp_path / "layers.png"))
    assert is_png(inspect.plot_projections(trained.snapshots, tmp_path / "proj.png"))
    assert is_png(inspect.plot_ablation(ABLATION, tmp_path / "ablation.png"))
    assert is_png(inspect.plot_rounds(trained.history, tmp_path / "rounds.png", (0.45, 0.7)))
    assert is_png(inspect.plot_layers([{"round": 0, "fresh_d_accuracy": 1.0}], tmp_path / "empty.png"))


def test_projections_share_one_basis(trained):
    coords = inspect.projections(trained.snapshots, rounds=[0, 2])
    assert list(coords) == [0, 2]
    n = len(trained.snapshots[0]["source"])
    assert coords[0]["source"].shape == (n, 2) and coords[2]["target"].shape == (len(trained.snapshots[2]["target"]), 2)
    everything = torch.cat([coords[r][s] for r in (0, 2) for s in ("source", "target")])
    torch.testing.assert_close(everything.mean(0), torch.zeros(2), atol=1e-4, rtol=0)  # centred jointly
    assert inspect.pick_rounds({r: None for r in range(10)}) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="rounds= names \\[7\\], which have no snapshot"):
        inspect.projections(trained.snapshots, rounds=[7])
    with pytest.raises(ValueError, match="method= must be 'pca', 'gap' or 'tsne'"):
        inspect.projections(trained.snapshots, method="umap")


def test_gap_projection_puts_the_concept_on_the_x_axis(trained):
    coords = inspect.projections(trained.snapshots, rounds=[0, 2], method="gap")
    first = trained.snapshots[0]
    gap = first["target"].mean(0) - first["source"].mean(0)
    spread = coords[0]["target"][:, 0].mean() - coords[0]["source"][:, 0].mean()
    torch.testing.assert_close(spread, gap.norm(), rtol=1e-4, atol=1e-4)


def test_tsne_needs_scikit_learn(trained):
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs scikit-learn"):
            inspect.projections(trained.snapshots, method="tsne")
        return
    coords = inspect.projections(trained.snapshots, rounds=[0], method="tsne")
    assert coords[0]["source"].shape[1] == 2


def embedded_images(page):
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(data) for data in found]


def test_report_holds_the_tables_and_embedded_images(tmp_path, trained):
    out = write_report(trained, tmp_path / "r" / "report.html", ablation=ABLATION)
    page = out.read_text(encoding="utf-8")
    for table in ("rounds", "layers", "ablation", "config", "concept"):
        assert f'<table id="{table}">' in page
    images = embedded_images(page)
    assert len(images) == 5 and all(image[:8] == PNG for image in images)  # rounds, layers, 2 projections, ablation
    assert "sad → happy" in page and "blocks.1.hook_resid_post" in page and "src=\"http" not in page
    assert page.count("<tr>") >= len(trained.history) + len(trained.layers()) + 4  # ablation: full, none, 2 variants
    assert "without blocks.1.hook_resid_post" in page and "only blocks.1.hook_resid_post" in page
    assert "<th>adapter_seconds</th>" in page  # how each round's time splits between training and measuring


def test_report_from_a_folder_picks_up_a_stored_ablation(tmp_path, trained):
    trained.save(tmp_path / "e")
    without = write_report(tmp_path / "e", tmp_path / "a.html").read_text(encoding="utf-8")
    assert '<table id="ablation">' not in without and len(embedded_images(without)) == 4
    save_ablation(ABLATION, tmp_path / "e")
    assert main(["report", str(tmp_path / "e")]) == 0
    page = (tmp_path / "e" / "report.html").read_text(encoding="utf-8")
    assert '<table id="ablation">' in page and len(embedded_images(page)) == 5
    with pytest.raises(TypeError, match="ablation= must be the list of rows"):
        write_report(trained, tmp_path / "b.html", ablation="ablation.json")


def test_report_cli_refuses_half_an_ablation_request(tmp_path, trained, capsys):
    trained.save(tmp_path / "e")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "e"), "--model", "x"])
    assert "--model and --concept-file go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "nowhere")])


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium is absent (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, trained):
    from PIL import Image

    html = write_report(trained, tmp_path / "report.html", ablation=ABLATION)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,1400",
                    html.as_uri()], check=True, capture_output=True, timeout=90)
    image = Image.open(shot).convert("L")
    assert image.size == (1000, 1400)
    low, high = image.getextrema()
    assert high - low > 100  # not a blank page: text and figures drew
    assert image.histogram()[:128] and sum(image.histogram()[:128]) > 5000  # plenty of dark pixels (text, plots)

"""Sweep collection (CCSR Table 5 layout, perception-distortion plot) and report tables, on
synthetic job summaries; the sweep recipe and the SLURM launcher config compose without plugins."""
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from sr_lab.eval import collect as C
from sr_lab.eval.report import markdown_table
from sr_lab.train import CONF_DIR


def job(tmp_path, num, variant, t_max, t_min, psnr, psnr_g, lpips=None, lstd=0.02, musiq=None):
    d = tmp_path / str(num)
    d.mkdir(parents=True)
    m = {"psnr": {"available": True, "mean": psnr, "g_std": psnr_g},
         "lpips": ({"available": True, "mean": lpips, "g_std": 0.01} if lpips is not None
                   else {"available": False, "reason": "metric lpips unavailable: missing weight file(s) X"}),
         "musiq": ({"available": True, "mean": musiq, "g_std": 2.0} if musiq is not None
                   else {"available": False, "reason": "metric musiq unavailable: missing weight file(s) Y"})}
    s = {"variant": variant, "overrides": [f"infer.sampler.t_max={t_max}", f"infer.sampler.t_min={t_min}"],
         "sampler": {"_target_": "sr_lab.diffusion.samplers.ccsr_truncated.sample", "steps": 45,
                     "t_max": t_max, "t_min": t_min}, "executed_steps": 15,
         "metrics": m, "stability": {"l_std": lstd}, "n_runs": 10, "n_images_all_runs": 3}
    (d / "summary.json").write_text(json.dumps(s))


@pytest.mark.parametrize("v,s", [(0.6667, "2T/3"), (0.3333, "T/3"), (0.5, "T/2"), (0.8, "4T/5"), (0.2, "T/5"),
                                 (1.0, "T"), (0.123, "0.123T")])
def test_t_fraction(v, s):
    assert C.t_fraction(v) == s


def test_collect_table5_layout_and_plot(tmp_path):
    job(tmp_path, 1, "A1", 0.5, 0.3333, 26.47, 0.2534, lpips=0.2507, musiq=62.95)
    job(tmp_path, 0, "CCSR", 0.6667, 0.3333, 26.24, 0.3660, lpips=0.2559, musiq=63.64)
    out = C.collect(tmp_path, ["psnr", "lpips", "musiq"], title="t")
    md = (tmp_path / "collected.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == "| Indices | (t_max, t_min, S) | ↑ PSNR/G-STD ↓ | ↓ LPIPS/G-STD ↓ | ↑ MUSIQ/G-STD ↓ | L-STD ↓ |"
    assert lines[2].startswith("| CCSR | (2T/3, T/3, 15) | 26.24/0.3660 | 0.2559/0.0100 | 63.64/2.0000 | 0.0200 |")
    assert lines[3].startswith("| A1 | (T/2, T/3, 15) | 26.47/0.2534 |")  # job order = job number
    assert out["pd_axes"] == ["psnr", "musiq"]
    assert (tmp_path / "perception_distortion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "collected.json").read_text())["rows"][0]["label"] == "CCSR"


def test_collect_unavailable_metrics_and_pil_fallback(tmp_path, monkeypatch):
    job(tmp_path, 0, None, 0.5, 0.2, 20.0, 0.1)
    job(tmp_path, 1, None, 0.6667, 0.2, 21.0, 0.2)

    def no_matplotlib(*a, **k):
        raise ImportError("matplotlib")

    monkeypatch.setattr(C, "_plot_matplotlib", no_matplotlib)
    out = C.collect(tmp_path, ["psnr", "lpips"], pd_y="auto")
    md = (tmp_path / "collected.md").read_text()
    assert "| infer.sampler.t_max=0.5 | (T/2, T/5, 15) | 20.00/0.1000 | n/a |" in md  # label: what differs
    assert "- lpips: metric lpips unavailable" in md
    assert out["pd_axes"] == ["psnr", None] and out["plot"] is None  # no perception metric at all
    plot = C.plot_pd(C.load_jobs(tmp_path), tmp_path / "pd.png", "psnr", "psnr")
    assert plot is not None and plot.stat().st_size > 0  # drawn with PIL


def test_failed_job_is_a_row_with_its_error(tmp_path):
    job(tmp_path, 0, "A1", 0.5, 0.3333, 26.0, 0.3, lpips=0.25, musiq=60.0)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "failed.json").write_text(json.dumps({
        "error": "config error: infer.sampler.t_min=0.5 must be smaller than sampler.t_max=0.3",
        "variant": None, "overrides": ["infer.sampler.t_max=0.3", "infer.sampler.t_min=0.5"]}))
    C.collect(tmp_path, ["psnr", "lpips"])
    md = (tmp_path / "collected.md").read_text()
    assert "| infer.sampler.t_max=0.3 infer.sampler.t_min=0.5 |  | failed | failed | failed |" in md
    assert "- infer.sampler.t_max=0.3 infer.sampler.t_min=0.5: config error: infer.sampler.t_min=0.5" in md


def test_collect_cli_errors_on_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        C.main([str(tmp_path)])
    assert e.value.code == 2 and "no */summary.json" in capsys.readouterr().out


def test_markdown_table_layout():
    summary = {"metrics": {"psnr": {"available": True, "mean": 24.4567, "g_std": 0.25, "source": "pyiqa psnr"},
                           "fid": {"available": True, "mean": 35.1, "g_std": None},
                           "niqe": {"available": False, "reason": "metric niqe unavailable: missing weight file(s) N"}},
               "stability": {"l_std": 0.0288}, "n_runs": 10, "n_images_all_runs": 100, "unavailable": {"niqe": "x"},
               "psnr_ssim_crosscheck": {}, "pairing": {}}
    md = markdown_table(summary)
    assert "| ↑ PSNR | 24.46 | 0.2500 |" in md
    assert "| ↓ FID | 35.10 | – |" in md
    assert "| ↓ NIQE | n/a | n/a |" in md
    assert "| L-STD ↓ | 0.0288 | |" in md


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        return compose("eval", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("variant,t_max,t_min", [("A1", 0.5, 0.3333), ("A2", 0.6667, 0.5), ("A3", 0.8, 0.3333),
                                                 ("A4", 0.6667, 0.2), ("CCSR", 0.6667, 0.3333)])
def test_ccsr_tmax_tmin_recipe(variant, t_max, t_min, tmp_path):
    from sr_lab.eval.inference import executed_steps, infer_config

    cfg = _compose(["sweep=ccsr_tmax_tmin", f"variant={variant}", f"lr_dir={tmp_path}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.variant == "A1,A2,A3,A4,CCSR"
    with open_dict(cfg):
        del cfg["hydra"]
    ic = infer_config(cfg, tmp_path / "infer")
    assert (ic.sampler.t_max, ic.sampler.t_min, ic.sampler.grid) == (t_max, t_min, 45)
    assert list(ic.seeds) == list(range(10)) and cfg.run_inference is True
    # CCSR Table 5 "S": 8, 8, 21, 21, 15 executed steps (after the one-step prediction at T)
    assert executed_steps(dict(ic.sampler)) == {"A1": 8, "A2": 8, "A3": 21, "A4": 21, "CCSR": 15}[variant]


@pytest.mark.parametrize("variant,alpha,beta", [("alpha0", 0.0, 0.01), ("ClearSR", 0.01, 0.01),
                                                ("alpha0_03", 0.03, 0.01), ("beta0_05", 0.01, 0.05)])
def test_clearsr_lsa_recipe(variant, alpha, beta, tmp_path):
    """ClearSR Fig. 7: one job per (alpha, beta); the whole LSA hook (conf/hook/lsa.yaml) at 50 DDPM steps."""
    from sr_lab.diffusion.hooks import LSAHook
    from sr_lab.eval.inference import infer_config

    cfg = _compose(["sweep=clearsr_lsa", f"variant={variant}", f"lr_dir={tmp_path}", "infer.checkpoint=/c"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.variant == \
        "alpha0,ClearSR,alpha0_02,alpha0_03,alpha0_05,beta0,beta0_02,beta0_03,beta0_05"
    with open_dict(cfg):
        del cfg["hydra"]
    ic = infer_config(cfg, tmp_path / "infer")
    h = ic.sampler.hook
    assert h._target_ == "sr_lab.diffusion.hooks.LSAHook" and (h.alpha, h.beta) == (alpha, beta)
    assert (h.early_end, h.late_start, h.key) == (0.3, 0.8, "lr_latent")
    from hydra.utils import instantiate

    hook = instantiate({k: v for k, v in h.items() if v is not None})
    assert isinstance(hook, LSAHook) and (hook.alpha, hook.beta) == (alpha, beta)
    assert ic.sampler.steps == 50 and ic.sampler._target_.endswith("ddpm_spaced.sample") and ic.start == "lr"
    assert list(cfg.collect.metrics) == ["psnr", "ssim", "maniqa", "musiq", "niqe"]


def test_slurm_launcher_composes_without_the_plugin_and_ties_tasks_to_gpus():
    cfg = _compose(["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4", "sr_dir=/x"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 4

"""The studio's pieces without a browser: who may talk to it, where it may write, and that its forms, jobs and
files are the commands' own (same flags, same checks, same files)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the studio's extra is not installed (pip install -e .[ui])")

from starlette.testclient import TestClient  # noqa: E402

from musubi_tuner.errors import UserError  # noqa: E402
from musubi_tuner.ui import commands, dataset_form  # noqa: E402
from musubi_tuner.ui.app import create_app  # noqa: E402
from musubi_tuner.ui.forms import command_flags, form_schema, form_values  # noqa: E402
from musubi_tuner.ui.jobs import Jobs  # noqa: E402
from musubi_tuner.ui.server import build_parser, serving  # noqa: E402
from musubi_tuner.ui.workspace import Workspace  # noqa: E402

STUDIO = {"X-Musubi-Studio": "1"}
TRAIN = ["--dit", "d.pt", "--dataset_config", "x.toml", "--sdpa", "--mixed_precision", "bf16", "--fp8_base", "--optimizer_type",
         "adamw8bit", "--learning_rate", "2e-4", "--network_module", "networks.lora", "--network_dim", "32",
         "--network_args", "loraplus_lr_ratio=4", "exclude_patterns=['.*single.*']", "--max_train_epochs", "16", "--output_name", "a b"]


def client(tmp_path, **kwargs) -> TestClient:
    return TestClient(create_app(Workspace(tmp_path / "ws"), **kwargs), base_url="http://127.0.0.1:7860")


def train_values(out: str) -> dict:
    return form_values(commands.parser_for("train"), TRAIN + ["--output_dir", out])


def inputs_there(folder: Path, *names: str) -> None:
    """Stand-ins for the files a command line reads (a job starts only when they are there; they are not read)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


# ------------------------------------------------------------------------------------ who may talk to it


def test_a_loopback_studio_answers_only_requests_addressed_to_loopback(tmp_path):
    studio = client(tmp_path)
    assert studio.get("/static/studio.css").status_code == 200
    assert studio.get("/static/studio.css", headers={"Host": "localhost:7860"}).status_code == 200
    rebound = studio.get("/static/studio.css", headers={"Host": "attacker.example:7860"})  # DNS rebinding
    assert rebound.status_code == 403 and "127.0.0.1 only" in rebound.text


def test_changes_need_the_studios_own_header_so_other_sites_cannot_post(tmp_path):
    studio = client(tmp_path)
    body = {"values": train_values("out")}
    assert studio.post("/api/command/train", json=body).status_code == 403
    assert studio.post("/api/command/train", json=body, headers=STUDIO).status_code == 200


def test_with_a_token_nothing_is_served_without_it_and_the_printed_url_sets_a_cookie(tmp_path):
    studio = client(tmp_path, token="s3cret-token", loopback_only=False)
    assert studio.get("/static/studio.css").status_code == 401
    assert studio.get("/static/studio.css?token=wrong-token").status_code == 401
    assert studio.get("/static/studio.css", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    first = studio.get("/static/studio.css?token=s3cret-token", follow_redirects=False)
    assert first.status_code == 303 and "token" not in first.headers["location"]
    assert studio.get("/static/studio.css").status_code == 200  # the cookie from the redirect


def test_listen_always_has_a_token_and_loopback_needs_none():
    assert serving(build_parser().parse_args([])) == ("127.0.0.1", None)
    host, token = serving(build_parser().parse_args(["--listen"]))
    assert host == "0.0.0.0" and len(token) >= 16
    assert serving(build_parser().parse_args(["--listen", "10.0.0.5", "--token", "longenough"])) == ("10.0.0.5", "longenough")
    with pytest.raises(UserError, match="--token: use at least 8"):
        serving(build_parser().parse_args(["--listen", "--token", "short"]))


# ------------------------------------------------------------------------------------ where it may write


@pytest.mark.parametrize("url, request_body, field", [
    ("/api/dataset/save", {"path": 5, "config": {}}, "'path' must be a string, not 5"),
    ("/api/dataset/save", {"path": "a.toml", "config": []}, "'config' must be an object, not []"),
    ("/api/dataset/toml", {"config": "x"}, "'config' must be an object"),
    ("/api/dataset/inspect", {"path": ["a"]}, "'path' must be a string"),
    ("/api/dataset/cache", {"toml": 5}, "'toml' must be a string"),
    ("/api/command/train", {"values": 5}, "'values' must be an object"),
    ("/api/plan", {"values": [1]}, "'values' must be an object"),
    ("/api/jobs", {"command": "train", "values": 5}, "'values' must be an object"),
])
def test_a_request_field_of_the_wrong_type_is_a_400_naming_it_not_a_server_error(tmp_path, url, request_body, field):
    response = client(tmp_path).post(url, json=request_body, headers=STUDIO)
    assert response.status_code == 400 and field in response.json()["error"], response.text


def test_commands_that_would_write_outside_the_workspace_are_refused(tmp_path):
    studio = client(tmp_path)
    refused = studio.post("/api/command/train", json={"values": train_values(str(tmp_path / "elsewhere"))}, headers=STUDIO)
    assert refused.status_code == 400 and refused.json()["error"].startswith(f"--output_dir = {tmp_path / 'elsewhere'}: outside the workspace")
    escape = studio.post("/api/command/generate", json={"values": {"save_path": "../up", "dit": "d", "vae": "v", "prompt": "p"}},
                         headers=STUDIO)
    assert "--save_path = ../up: outside the workspace" in escape.json()["error"]
    inside = studio.post("/api/command/train", json={"values": train_values("runs/one")}, headers=STUDIO).json()
    assert f"--output_dir {tmp_path / 'ws' / 'runs' / 'one'}" in inside["shown"]


def test_a_flag_smuggled_in_another_fields_words_is_refused_and_a_value_that_starts_with_a_dash_stays_a_value(tmp_path):
    """fuzz_ac 1: "video_size": "64 64 --save_path=/elsewhere", or a second line "--save_merged_model=/elsewhere" in the LoRA
    list, became a flag of the command line: a video and a merged DiT were written outside the workspace."""
    studio = client(tmp_path)
    model = {"dit": "d", "vae": "v", "prompt": "p", "save_path": "videos"}
    for values, field in ((dict(model, video_size=f"64 64 --save_path={tmp_path / 'out'}", save_path=""), "--video_size"),
                          (dict(model, lora_weight=f"x.safetensors\n--save_merged_model={tmp_path / 'm.safetensors'}"), "--lora_weight"),
                          (dict(model, latent_path=f"a.safetensors\n--save_path={tmp_path / 'out'}"), "--latent_path")):
        refused = studio.post("/api/command/generate", json={"values": values}, headers=STUDIO)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"].startswith(f"{field}: '--save_") and "starts with a dash, which the command reads as an option" in refused.json()["error"]
    # one word that starts with a dash is the flag's value (it was "expected one argument"), and reads back into the form
    shown = studio.post("/api/command/generate", json={"values": dict(model, prompt="-- cinematic, a cat", video_size="64 -64")},
                        headers=STUDIO)
    assert shown.status_code == 400 and "-64" in shown.json()["error"]  # (a negative number is a value, judged by the command)
    ok = studio.post("/api/command/generate", json={"values": dict(model, prompt="-- cinematic, a cat")}, headers=STUDIO).json()["shown"]
    assert "'--prompt=-- cinematic, a cat'" in ok
    from musubi_tuner.hv_generate_video import build_parser as generate_parser
    from musubi_tuner.ui.forms import split_flags

    flags = split_flags(ok)
    assert form_values(generate_parser(), flags[flags.index("--dit"):])["prompt"] == "-- cinematic, a cat"


def test_a_symlink_inside_the_workspace_does_not_lead_writes_or_reads_outside(tmp_path):
    workspace = Workspace(tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (workspace.root / "link").symlink_to(outside)
    with pytest.raises(UserError, match="outside the workspace"):
        workspace.writable("link/lora", "--output_dir")
    studio = client(tmp_path)
    assert studio.get("/files", params={"path": str(outside / "secret.txt")}).status_code == 403
    assert studio.get("/files", params={"path": str(workspace.root / "link" / "secret.txt")}).status_code == 403


def test_caching_from_the_studio_needs_the_configs_cache_folders_in_the_workspace(tmp_path):
    from musubi_tuner.demo.synthetic_data import make_synthetic_dataset

    toml = make_synthetic_dataset(tmp_path / "data", num_videos=0, num_images=1)  # caches beside it, outside the workspace
    with pytest.raises(UserError, match=r"\[\[datasets\]\]\[0\]\.cache_directory = .*: outside the workspace"):
        commands.caching_commands(str(toml), "vae.pt", "te1", "te2", Workspace(tmp_path / "ws"))
    inside = make_synthetic_dataset(tmp_path / "ws" / "data", num_videos=0, num_images=1)
    latents, text = commands.caching_commands(str(inside), "vae.pt", "te1", "te2", Workspace(tmp_path / "ws"))
    assert latents[1:3] == [os.path.relpath(Path(commands.__file__).parents[1] / "cache_latents.py"), "--dataset_config"]
    assert text[1].endswith("cache_text_encoder_outputs.py")


# ------------------------------------------------------------------------------------ the commands' own forms


@pytest.mark.parametrize("command", ["train", "generate", "plan"])
def test_the_form_offers_every_visible_flag_of_the_command_with_its_help(command):
    parser = commands.parser_for(command)
    visible = {max(a.option_strings, key=len) for a in parser._actions if a.option_strings and a.help != "==SUPPRESS=="} - {"--help"}
    fields = [f for group in form_schema(parser) for f in group["fields"]]
    assert {f["flag"] for f in fields} == visible
    assert all(f["help"] for f in fields)


def test_a_command_read_into_the_form_comes_back_as_the_same_command():
    parser = commands.parser_for("train")
    flags = command_flags(parser, form_values(parser, TRAIN))
    assert vars(parser.parse_args(flags)) == vars(parser.parse_args(TRAIN))
    assert flags[flags.index("--network_args") + 1:][:2] == ["loraplus_lr_ratio=4", "exclude_patterns=['.*single.*']"]


def test_a_bad_value_in_the_form_is_the_commands_own_one_line_error():
    parser = commands.parser_for("generate")
    with pytest.raises(UserError, match=r"^--video_length 24 is not 4N\+1"):
        command_flags(parser, {"dit": "d", "vae": "v", "save_path": "o", "prompt": "p", "video_length": "24"})


def test_resume_reruns_the_training_command_from_the_newest_state():
    from musubi_tuner.launch import training_command

    cmd = training_command(["--output_dir", "o", "--resume", "o/x-state"])
    assert commands.with_resume(cmd)[-4:] == ["--output_dir", "o", "--resume", "auto"]


def test_resume_of_a_run_that_continued_a_state_and_saved_none_continues_that_state_again(tmp_path):
    """fuzz_ax 8: Resume replaced --resume FOLDER by --resume auto: a run continuing another folder's state (or the
    Hub's), stopped before its first save, restarted from step 0; one of the Hub could not be resumed at all."""
    import json

    from musubi_tuner.launch import training_command

    out = tmp_path / "o"
    outputs = {"output_dir": str(out), "output_name": "x"}
    local = training_command(["--output_dir", str(out), "--output_name", "x", "--resume", "elsewhere/x-step00000006-state"])
    hub = training_command(["--output_dir", str(out), "--output_name", "x", "--resume", "me/repo/x-state", "--resume_from_huggingface"])
    config = tmp_path / "run.toml"  # (given by the run's --config_file: fuzz_az 2)
    config.write_text('resume = "elsewhere/x-step00000006-state"\n')
    in_config = training_command(["--output_dir", str(out), "--output_name", "x", "--config_file", str(config)])
    started = time.time()
    for cmd in (local, hub, in_config):
        assert commands.with_resume(cmd, outputs, started) == cmd  # nothing saved since: the same state again
    state = out / "x-step00000002-state"  # then one of its own
    state.mkdir(parents=True)
    (state / "train_state.json").write_text(json.dumps({"global_step": 2, "epoch": 0, "batch_in_epoch": 2,
                                                       "run": {"process_started": started + 5}}))
    for cmd in (local, hub, in_config):
        resumed = commands.with_resume(cmd, outputs, started)
        assert resumed[-2:] == ["--resume", "auto"] and resumed.count("--resume") == 1 and "--resume_from_huggingface" not in resumed


# ------------------------------------------------------------------------------------ the dataset form


def test_the_dataset_form_saves_only_a_config_the_loader_accepts(tmp_path):
    (tmp_path / "clips").mkdir()
    config = {"general": {"resolution": [64, 64], "caption_extension": ".txt", "enable_bucket": None},
              "datasets": [{"video_directory": "clips", "cache_directory": "cache", "target_frames": [1, 25],
                            "frame_extraction": "heads", "control_directory": "kept as it was"}]}
    target = tmp_path / "dataset.toml"
    with pytest.raises(UserError, match=rf"^{target}: \[\[datasets\]\]\[0\]\.frame_extraction = \"heads\""):
        dataset_form.save(target, config)
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / "clips"]
    config["datasets"][0]["frame_extraction"] = "chunk"
    dataset_form.save(target, config)
    from musubi_tuner.data.config import load_dataset_config, read_config_file

    loaded = load_dataset_config(target).datasets[0]
    assert (loaded.video_directory, loaded.target_frames, loaded.frame_extraction) == (tmp_path / "clips", (1, 25), "chunk")
    assert read_config_file(target)["datasets"][0]["control_directory"] == "kept as it was"  # keys for other models survive


def test_a_musubi_tuner_config_saved_from_the_form_still_loads_there_and_its_dropped_comments_are_said(tmp_path):
    """fuzz_av 2: the page sends source_fps = 24.0 as 24 (a browser's number), written as an integer that musubi-tuner
    refuses; the file's comments went without a word; a path holding DEL was written as TOML that does not parse."""
    from musubi_tuner.data.config import read_config_file

    studio = client(tmp_path)
    (tmp_path / "ws" / "clips\x7f").mkdir(parents=True)
    target = tmp_path / "ws" / "m.toml"
    target.write_text('# my notes\n[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\n[[datasets]]\n'
                      'video_directory = "clips"\ncache_directory = "cache#1"  # where\nsource_fps = 24.0\n')
    opened = studio.get("/api/dataset", params={"path": "m.toml"}).json()
    assert opened["comments"] == 2  # (not the # in "cache#1")
    config = json.loads(json.dumps(opened["config"]).replace("24.0", "24"))  # as the page sends it back
    config["datasets"][0]["video_directory"] = "clips\x7f"
    saved = studio.post("/api/dataset/save", json={"path": "m.toml", "config": config}, headers=STUDIO)
    assert saved.status_code == 200 and saved.json()["comments_dropped"] == 2, saved.text
    written = read_config_file(target)["datasets"][0]
    assert type(written["source_fps"]) is float and written["video_directory"] == "clips\x7f"
    assert studio.get("/api/dataset", params={"path": "m.toml"}).json()["comments"] == 0
    config["datasets"][0]["source_fps"] = 10**400  # (past any float: a 500 and a traceback, fuzz_az 8)
    refused = studio.post("/api/dataset/save", json={"path": "m.toml", "config": config}, headers=STUDIO)
    assert refused.status_code == 400 and "source_fps" in refused.json()["error"], refused.text


def test_every_dataset_key_has_a_form_field():
    from musubi_tuner.data import config

    schema = dataset_form.form_schema()
    assert {f["key"] for f in schema["video"]} == set(config.SHARED_KEYS) | set(config.VIDEO_KEYS)
    assert {f["key"] for f in schema["image"]} == set(config.SHARED_KEYS) | set(config.IMAGE_KEYS)


# ------------------------------------------------------------------------------------ jobs


def test_a_job_is_a_child_process_that_a_new_server_finds_and_that_stops_on_request(tmp_path):
    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("generate", "sleeper", [[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]])
    deadline = time.monotonic() + 30
    while "started" not in jobs.log_tail(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    again = Jobs(tmp_path / "jobs").get(job.id)  # what a restarted server (or a reloaded page) reads
    while again.state == "starting" and time.monotonic() < deadline:  # job.json is written just after the child starts
        time.sleep(0.05)
        again = Jobs(tmp_path / "jobs").get(job.id)
    assert (again.state, again.pid, again.commands) == ("running", jobs.get(job.id).pid, job.commands)
    jobs.stop(job.id)
    while jobs.get(job.id).state == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs.get(job.id).state == "stopped" and Jobs(tmp_path / "jobs").get(job.id).state == "stopped"
    assert jobs.log_tail(job).startswith("$ python -c ")


# ------------------------------------------------------------------------------------ what a dataset produces


def test_inspecting_a_dataset_lists_its_clips_windows_previews_and_every_problem_caching_would_meet(tmp_path):
    """Without a model: the clips are the caches caching would write, the windows per frame_extraction agree with
    them, the preview clip has the clip's frames, and skipped / unreadable / too short items are listed with why."""
    import numpy as np

    from musubi_tuner.data.media import load_video, write_video
    from musubi_tuner.demo.synthetic_data import make_synthetic_dataset
    from musubi_tuner.ui.dataset_view import inspect_dataset

    toml = make_synthetic_dataset(tmp_path / "data", num_videos=1, num_images=2, frames=9)
    toml.write_text(toml.read_text().replace('target_frames = [9]\nframe_extraction = "head"',
                                             'target_frames = [5, 13]\nframe_extraction = "uniform"\nframe_sample = 2'))
    images = tmp_path / "data" / "images"
    (images / "image_0001.txt").unlink()
    (images / "broken.png").write_bytes(b"not a png")
    (images / "broken.txt").write_text("a caption for a file that is no image")
    write_video(tmp_path / "data" / "videos" / "short.mp4", np.zeros((3, 64, 64, 3), np.uint8))
    (tmp_path / "data" / "videos" / "short.txt").write_text("three black frames")
    (tmp_path / "data" / "videos" / "uncaptioned.mp4").write_bytes((tmp_path / "data" / "videos" / "clip_0000.mp4").read_bytes())
    image_ds, video_ds = inspect_dataset(toml, tmp_path / "previews")["datasets"]

    assert [(p["path"], p["what"]) for p in image_ds["problems"]] == [(str(images / "broken.png"), "failed"),
                                                                       (str(images / "image_0001.png"), "skipped")]
    assert "not a readable image" in image_ds["problems"][0]["reason"] and "no caption" in image_ds["problems"][1]["reason"]
    assert [i["name"] for i in image_ds["items"]] == ["image_0000.png"] and image_ds["buckets"] == ["64x64"]
    assert image_ds["items"][0]["text_cache"] == "missing" and image_ds["items"][0]["clips"][0]["status"] == "missing"

    clip = next(i for i in video_ds["items"] if i["name"] == "clip_0000.mp4")
    assert [(Path(p["path"]).name, p["what"]) for p in video_ds["problems"]] == [("short.mp4", "skipped"), ("uncaptioned.mp4", "failed")]
    assert video_ds["problems"][0]["reason"] == "only 3 frames, shorter than every target_frames [5, 13]"
    assert "uncaptioned.txt: caption file not found" in video_ds["problems"][1]["reason"]
    assert [[c["start"], c["frames"]] for c in clip["clips"]] == clip["windows_by_mode"]["uniform"] == [[0, 5], [4, 5]]
    assert clip["windows_by_mode"]["full"] == [[0, 9]] and len(clip["windows_by_mode"]["slide"]) == 5
    assert [c["cache"] for c in clip["clips"]] == ["clip_0000_00000-005_0064x0064_hv.safetensors",
                                                   "clip_0000_00004-005_0064x0064_hv.safetensors"]
    preview, source = load_video(clip["clips"][1]["preview"]).frames, load_video(clip["path"]).frames
    assert preview.shape == (5, 64, 64, 3) and Path(clip["clips"][1]["thumbnail"]).is_file()
    error = lambda frames: np.abs(preview.astype(int) - frames.astype(int)).mean()  # noqa: E731
    assert error(source[4:9]) < 4 < error(source[0:5])  # the preview shows the window's own frames (lossy mp4)


@pytest.mark.parametrize("max_frames,frames", [(9, None), (33, 24)])
def test_inspect_shows_a_videos_length_only_when_its_decode_reached_the_end(tmp_path, max_frames, frames):
    """fuzz_av 4: `full` decodes up to max_frames, and the page showed a 24-frame video as "9 frames", with the clips each
    frame_extraction would take from a 9-frame video."""
    import numpy as np

    from musubi_tuner.data.media import write_video
    from musubi_tuner.ui.dataset_view import inspect_dataset

    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "long.mp4", np.zeros((24, 64, 64, 3), np.uint8))
    (tmp_path / "videos" / "long.txt").write_text("a long clip")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\n[[datasets]]\nvideo_directory = "{tmp_path / "videos"}"\n'
                    f'cache_directory = "{tmp_path / "cache"}"\nframe_extraction = "full"\nmax_frames = {max_frames}\n')
    (item,) = inspect_dataset(toml, tmp_path / "previews")["datasets"][0]["items"]
    assert item["source_frames"] == frames
    assert (item["windows_by_mode"] or {}).get("chunk", []) == ([[s, 1] for s in range(24)] if frames else [])  # (target_frames [1])


def test_the_stop_and_resume_buttons_stop_a_run_and_rerun_the_training_command_with_resume_auto(tmp_path):
    """Through the endpoints the pages' buttons call; the 'training command' here is a Python one-liner."""
    app = create_app(Workspace(tmp_path / "ws"))
    studio, jobs = TestClient(app, base_url="http://127.0.0.1:7860"), app.app.state.jobs
    script = ("import sys, time; from musubi_tuner.progress import progress_bar; progress_bar(total=9, desc='steps').close(); "
              "print('args', sys.argv[1:], flush=True); time.sleep(float(sys.argv[1]))")  # (a run that reached its steps)

    def wait(job_id: str, state: str) -> dict:
        deadline = time.monotonic() + 30
        while (detail := studio.get(f"/api/jobs/{job_id}").json())["state"] != state and time.monotonic() < deadline:
            time.sleep(0.05)
        return detail

    running = jobs.start("train", "demo-lora", [[sys.executable, "-c", script, "20"]], {"output_dir": str(tmp_path / "ws" / "o"),
                                                                                          "output_name": "demo-lora"})
    wait(running.id, "running")
    deadline = time.monotonic() + 30
    while "args ['20']" not in studio.get(f"/api/jobs/{running.id}").json()["log"] and time.monotonic() < deadline:
        time.sleep(0.05)  # (past its steps bar)
    refused = studio.post(f"/api/jobs/{running.id}/resume", headers=STUDIO)
    assert refused.status_code == 400 and refused.json()["error"] == f"{running.id} is still running"
    assert studio.post(f"/api/jobs/{running.id}/stop", headers=STUDIO).status_code == 200
    assert wait(running.id, "stopped")["state"] == "stopped"

    assert studio.get(f"/api/jobs/{running.id}").json()["resumable"]
    resumed = studio.post(f"/api/jobs/{running.id}/resume", headers=STUDIO).json()
    assert resumed["resumed_from"] == running.id and resumed["commands"][0][-2:] == ["--resume", "auto"]
    assert resumed["shown"][0].endswith("time.sleep(float(sys.argv[1]))' 20 --resume auto")
    deadline = time.monotonic() + 30
    printed = "args ['20', '--resume', 'auto']"  # what the child got
    while printed not in (log := studio.get(f"/api/jobs/{resumed['id']}").json()["log"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert printed in log
    studio.post(f"/api/jobs/{resumed['id']}/stop", headers=STUDIO)
    assert wait(resumed["id"], "stopped")["state"] == "stopped"

    generation = jobs.start("generate", "a cat", [[sys.executable, "-c", "pass"]], {"save_path": str(tmp_path / "ws" / "videos")})
    wait(generation.id, "finished")
    assert studio.post(f"/api/jobs/{generation.id}/resume", headers=STUDIO).json()["error"].startswith("only training runs resume")


def test_a_training_job_that_ended_before_its_first_step_offers_no_resume(tmp_path):
    """fuzz_at 2: a job refused because another run held its folder offered Resume; once that run had finished, Resume's
    --resume auto found no state of the job and trained afresh over the other run's LoRA and loss curve."""
    app = create_app(Workspace(tmp_path / "ws"))
    studio, jobs = TestClient(app, base_url="http://127.0.0.1:7860"), app.app.state.jobs
    refused = jobs.start("train", "demo-lora", [[sys.executable, "-c", "import sys; sys.exit('error: another training run is using this')"]],
                         {"output_dir": str(tmp_path / "ws" / "o"), "output_name": "demo-lora"})
    deadline = time.monotonic() + 30
    while (detail := studio.get(f"/api/jobs/{refused.id}").json())["state"] in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert detail["state"] == "failed" and detail["resumable"] is False
    response = studio.post(f"/api/jobs/{refused.id}/resume", headers=STUDIO)
    assert response.status_code == 400 and response.json()["error"] == (
        f"{refused.id} ended before its first training step, and its folder holds no state of its run: there is nothing of "
        "it to resume; start it again from the Train page")
    assert [j.id for j in jobs.all()] == [refused.id]  # (no job started)

    # a Resume stopped before its first step, where its run saved states: Resume continues them (it lost its button, and
    # the Train page's Start trained over the run from step 0: fuzz_bf 1)
    import torch

    from musubi_tuner.training.state import TrainProgress, save_state

    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters())
    save_state(tmp_path / "ws" / "o" / "demo-lora-step00000004-state", network_state=net.state_dict(), optimizer=optimizer,
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), scaler=None,
               progress=TrainProgress(global_step=4), process_index=0, is_main=True, wait=lambda: None)
    # (the refused job, a fresh Start, has none of its own: the state is an earlier run's, fuzz_bg 3)
    assert studio.get(f"/api/jobs/{refused.id}").json()["resumable"] is False
    stopped_resume = jobs.start("train", "demo-lora", [[sys.executable, "-c", "import sys; sys.exit(1)"]],
                                {"output_dir": str(tmp_path / "ws" / "o"), "output_name": "demo-lora"}, resumed_from="earlier")
    while jobs.get(stopped_resume.id).state in ("starting", "running") and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    assert studio.get(f"/api/jobs/{stopped_resume.id}").json()["resumable"] is True


# ------------------------------------------------------------------------------------ off the happy path


@pytest.mark.parametrize("change, error", [
    ({"output_name": "../../escaped"}, r"--output_name \.\./\.\./escaped: leads out of --output_dir with '\.\.'"),
    ({"output_name": "/elsewhere/lora"}, "--output_dir / --output_name = /elsewhere/lora: outside the workspace"),
    ({"logging_dir": "logs", "log_prefix": "../../outside/run_"}, r"--log_prefix \.\./\.\./outside/run_: leads out of --logging_dir"),
])
def test_training_may_not_write_outside_the_workspace_through_the_name_or_the_log_prefix(tmp_path, change, error):
    """The trainer joins --output_dir with --output_name and --logging_dir with --log_prefix: the joined folders are
    what is checked, not the flags one by one."""
    studio = client(tmp_path)
    values = {**train_values("runs"), **change}
    for url in ("/api/command/train", "/api/jobs"):
        refused = studio.post(url, json={"command": "train", "values": values}, headers=STUDIO)
        assert refused.status_code == 400 and re.search(error, refused.json()["error"]), refused.text
    assert not (tmp_path / "escaped.safetensors").exists()
    assert list((tmp_path / "ws" / "jobs").iterdir()) == []  # no job was started


def test_a_config_file_that_sends_the_lora_elsewhere_is_refused_too(tmp_path):
    config = tmp_path / "ws" / "options.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'output_dir = "{tmp_path / "elsewhere"}"\n')
    values = {k: v for k, v in train_values("unused").items() if k != "output_dir"} | {"config_file": str(config)}
    refused = client(tmp_path).post("/api/command/train", json={"values": values}, headers=STUDIO)
    assert refused.status_code == 400 and f"= {tmp_path / 'elsewhere' / 'a b'}: outside the workspace" in refused.json()["error"]


def test_a_config_files_relative_folders_are_the_workspaces_where_the_run_writes_too(tmp_path):
    """They were checked inside the workspace but written by the trainer relative to the studio's own folder."""
    ws = tmp_path / "ws"
    config = ws / "options.toml"
    config.parent.mkdir(parents=True)
    config.write_text('output_dir = "relout"\nlogging_dir = "rellogs"\n')
    inputs_there(ws, "d.pt", "x.toml")
    values = {k: v for k, v in train_values("unused").items() if k != "output_dir"} | {"config_file": str(config)}
    argv, outputs = commands.job("train", values, Workspace(ws))
    assert outputs["output_dir"] == str(ws / "relout")
    assert argv[argv.index("--output_dir") + 1] == str(ws / "relout") and argv[argv.index("--logging_dir") + 1] == str(ws / "rellogs")


def test_a_name_with_folders_inside_the_workspace_is_where_the_job_page_looks(tmp_path):
    studio = client(tmp_path)
    inputs_there(tmp_path / "ws", "d.pt", "x.toml")
    values = {**train_values("runs"), "output_name": "sub/my-lora"}
    assert commands.job("train", values, Workspace(tmp_path / "ws"))[1] == {"output_dir": str(tmp_path / "ws" / "runs" / "sub"),
                                                                          "output_name": "my-lora"}
    assert studio.post("/api/command/train", json={"values": values}, headers=STUDIO).status_code == 200


@pytest.mark.parametrize("url, request_body, error", [
    ("/api/command/generate", {"values": {"prompt": "p", "dit": "d", "vae": "v", "save_path": "v\u0000x"}}, "NUL character"),
    ("/api/command/generate", {"values": {"prompt": "p", "dit": "d\u0000", "vae": "v", "save_path": "v"}}, "--dit: holds a NUL"),
    ("/api/command/generate", {"values": {"prompt": 5, "dit": "d", "vae": "v", "save_path": "v", "fp8": True}},
     None),  # a number typed into a text field is text: the command's parser decides
    ("/api/command/generate", {"values": {"prompt": "p", "dit": "d", "vae": "v", "save_path": "v", "fp8": "yes"}},
     "--fp8: on or off"),
    ("/api/command/generate", {"values": {"prompt": "p", "dit": "d", "vae": "v", "save_path": "v", "lora_weight": {"a": 1}}},
     "--lora_weight: a value typed as text, not dict"),
    ("/api/dataset/save", {"path": "x\u0000.toml", "config": {}}, "NUL character"),
    ("/api/dataset/toml", {"config": {"general": {"num_repeats": 10 ** 400}}}, "num_repeats = 1000.*cannot be written as TOML"),
    ("/api/dataset/toml", {"config": {"datasets": [[1, 2]]}}, r"datasets\[0\] is not a table"),
])
def test_hostile_form_values_are_a_400_naming_the_field_never_a_server_error(tmp_path, url, request_body, error):
    response = client(tmp_path).post(url, json=request_body, headers=STUDIO)
    if error is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400 and re.search(error, response.json()["error"]), response.text


def test_a_path_with_a_nul_character_is_refused_when_served_or_uploaded(tmp_path):
    studio = client(tmp_path)
    assert studio.get("/files", params={"path": "a\u0000b"}).status_code == 403
    upload = studio.post("/api/upload", params={"name": "a\u0000b"}, content=b"x", headers=STUDIO)
    assert upload.status_code == 400 and "NUL character" in upload.json()["error"]
    dataset = studio.get("/api/dataset", params={"path": "a\u0000.toml"})
    assert dataset.status_code == 400 and "NUL character" in dataset.json()["error"]


def test_a_job_folder_that_cannot_be_written_is_a_400_and_no_job_is_listed(tmp_path):
    studio, jobs_folder = client(tmp_path), tmp_path / "ws" / "jobs"
    jobs_folder.rmdir()
    jobs_folder.write_text("a file where the jobs folder was")
    inputs_there(tmp_path / "ws", "d", "v")
    values = {"prompt": "p", "dit": "d", "vae": "v", "save_path": "videos"}
    refused = studio.post("/api/jobs", json={"command": "generate", "values": values}, headers=STUDIO)
    assert refused.status_code == 400 and "cannot start the job" in refused.json()["error"]
    assert studio.get("/api/jobs").json()["jobs"] == []


def test_a_workspace_the_studio_cannot_write_is_one_line_at_start(tmp_path):
    (tmp_path / "file").write_text("x")
    # (a file, or a file on the way, is named as that: it was "cannot write (File exists)", fuzz_ac 12)
    for given in (tmp_path / "file" / "ws", tmp_path / "file"):
        with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'file'))}: is a file, not a folder; choose another --workspace$"):
            Workspace(given)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "jobs").write_text("x")
    with pytest.raises(UserError, match=r"ws/jobs: cannot make the jobs folder"):
        create_app(Workspace(tmp_path / "ws"))


def test_a_job_outlives_a_killed_server_runs_its_later_commands_and_records_how_it_ended(tmp_path):
    """The server (a process here) starts a two-command job and is killed at once: the supervisor still runs the second
    command, and the next server reads the job as finished with its status; a job that fails says so in its log."""
    folder = tmp_path / "jobs"
    first = "import time; time.sleep(1.5); print('first done', flush=True)"
    second = f"open({str(tmp_path / 'second-ran')!r}, 'w').write('yes'); print('second done')"
    failing = "import sys; sys.exit(3)"
    server = (f"import os, signal, sys; from musubi_tuner.ui.jobs import Jobs; jobs = Jobs({str(folder)!r}); "
              f"jobs.start('cache', 'two', [[sys.executable, '-c', {first!r}], [sys.executable, '-c', {second!r}]]); "
              f"jobs.start('cache', 'fails', [[sys.executable, '-c', {failing!r}], [sys.executable, '-c', 'print(1)']]); "
              f"os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", server]).returncode == -9
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(j.state in ("starting", "running") for j in Jobs(folder).all()):
        time.sleep(0.1)
    jobs = Jobs(folder)  # the restarted server
    ended = {j.title: j for j in jobs.all()}
    assert (ended["two"].state, ended["two"].returncode) == ("finished", 0)
    assert (tmp_path / "second-ran").read_text() == "yes"
    assert "first done" in jobs.log_tail(ended["two"]) and "second done" in jobs.log_tail(ended["two"])
    assert (ended["fails"].state, ended["fails"].returncode) == ("failed", 3)
    assert jobs.log_tail(ended["fails"]).endswith("[studio] the command exited with status 3; 1 later command(s) not run\n")


def test_a_restarted_server_removes_what_a_supervisor_killed_while_writing_job_json_left(tmp_path):
    folder = tmp_path / "jobs"
    job = Jobs(folder).start("cache", "one", [[sys.executable, "-c", "print(1)"]])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and Jobs(folder).get(job.id).state in ("starting", "running"):
        time.sleep(0.1)
    killed = ("import os, signal, sys; from musubi_tuner.files import atomic_write\n"
              "with atomic_write(sys.argv[1]) as tmp:\n    tmp.write_text('{\"id\": ')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", killed, str(folder / job.id / "job.json")]).returncode == -9
    assert list((folder / job.id).glob(".job.json.*.tmp"))
    assert Jobs(folder).get(job.id).state == "finished"  # the restarted server
    assert not list((folder / job.id).glob(".job.json.*.tmp"))


def test_a_resumed_job_runs_in_the_folder_its_first_run_ran_in(tmp_path, monkeypatch):
    """Relative paths in a job's commands (the scripts' own, as the seed types them) still work after the studio is
    restarted from another folder."""
    (tmp_path / "here").mkdir()
    jobs = Jobs(tmp_path / "jobs")
    monkeypatch.chdir(tmp_path / "here")
    job = jobs.start("train", "t", [[sys.executable, "-c", "import os; print('in', os.getcwd())"]])
    monkeypatch.chdir(tmp_path)
    deadline = time.monotonic() + 30
    while jobs.get(job.id).state != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"in {tmp_path / 'here'}" in jobs.log_tail(job) and Jobs(tmp_path / "jobs").get(job.id).cwd == str(tmp_path / "here")


def test_a_stop_that_comes_while_a_finished_command_exits_leaves_the_job_finished(tmp_path):
    """F16 of the studio's fuzzing: Stop pressed after a training's final save, while it exited, made the run "stopped",
    with an atexit traceback in its log. The command's work was whole: the job is finished."""
    from musubi_tuner.ui.jobs import STARTING_SECONDS

    command = ("import atexit, sys, time; from musubi_tuner.errors import run_cli\n"
               "atexit.register(time.sleep, 3)  # (an exit that takes a while: data-loader workers being stopped)\n"
               f"run_cli(lambda argv: (time.sleep({STARTING_SECONDS + 0.5}), print('saved the LoRA', flush=True)), [])\n")
    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("train", "exiting", [[sys.executable, "-c", command]])
    deadline = time.monotonic() + 60
    while "\nsaved the LoRA\n" not in jobs.log_tail(job) and time.monotonic() < deadline:  # (the line, not the command)
        time.sleep(0.05)
    jobs.stop(job.id)
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    ended = Jobs(tmp_path / "jobs").get(job.id)
    assert (ended.state, ended.returncode) == ("finished", 0), jobs.log_tail(job)
    assert "Traceback" not in jobs.log_tail(job) and "stopped on request" not in jobs.log_tail(job)


def test_two_studios_on_one_workspace_see_each_others_jobs_and_start_one_training_into_a_folder(tmp_path):
    """F12 of the studio's fuzzing: a job another studio started was a 404 here until a restart, and Resume pressed
    twice (or in two studios) started two trainings into one folder, the second failing on the trainer's lock."""
    first, second = Jobs(tmp_path / "jobs"), Jobs(tmp_path / "jobs")
    sleeper = [[sys.executable, "-c", "import time; time.sleep(60)"]]
    job = first.start("train", "lora", sleeper, {"output_dir": str(tmp_path / "out"), "output_name": "lora"})
    try:
        assert second.get(job.id).title == "lora" and [j.id for j in second.all()] == [job.id]
        for studio, name in ((first, "lora"), (second, "lora"), (second, "lora-step00000004")):  # (its step-4 LoRA's name)
            with pytest.raises(UserError, match=rf"out: job {job.id} is training into it; wait for it to end, or stop it first"):
                studio.start("train", name, sleeper, {"output_dir": str(tmp_path / "out"), "output_name": name})
        other = second.start("train", "other", [[sys.executable, "-c", "pass"]], {"output_dir": str(tmp_path / "elsewhere")})
        beside = second.start("train", "lora-v2", [[sys.executable, "-c", "pass"]],  # (another name shares the folder, as the
                              {"output_dir": str(tmp_path / "out"), "output_name": "lora-v2"})  # trainer allows: fuzz_at 4)
        assert {j.id for j in first.all()} == {job.id, other.id, beside.id}
    finally:
        first.stop(job.id)
    deadline = time.monotonic() + 30
    while first.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    again = second.start("train", "lora", [[sys.executable, "-c", "pass"]], {"output_dir": str(tmp_path / "out")})
    assert again.id != job.id  # once it has ended, the folder takes a training again


def test_cache_pressed_twice_starts_one_caching_of_a_config_and_inspect_needs_a_path(tmp_path):
    """fuzz_ac 12: Cache pressed twice started two caching jobs on one config, the first then failing on the caching
    command's lock; Inspect with no path read the workspace's folder (".: expected a dataset config")."""
    jobs = Jobs(tmp_path / "jobs")
    sleeper = [[sys.executable, "-c", "import time; time.sleep(60)"]]
    job = jobs.start("cache", "cache d.toml", sleeper, {"dataset_config": str(tmp_path / "d.toml")})
    try:
        with pytest.raises(UserError, match=rf"d\.toml: job {job.id} is caching it; wait for it to end, or stop it first"):
            jobs.start("cache", "cache d.toml", sleeper, {"dataset_config": str(tmp_path / "d.toml")})
        other = jobs.start("cache", "cache e.toml", [[sys.executable, "-c", "pass"]], {"dataset_config": str(tmp_path / "e.toml")})
        assert other.id != job.id
    finally:
        jobs.stop(job.id)
    response = client(tmp_path).post("/api/dataset/inspect", json={"path": " "}, headers=STUDIO)
    assert response.status_code == 400 and response.json()["error"] == "give the path of a dataset config (.toml) to inspect"


def test_resume_from_a_folder_that_is_gone_says_so_and_leaves_no_job_behind(tmp_path):
    """F8 of the studio's fuzzing: with the folder the studio first ran from deleted, Resume said "cannot start the job
    (No such file or directory)" of the job folder, which existed, and that half-made job was listed after a restart."""
    (tmp_path / "was_here").mkdir()
    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("train", "lora", [[sys.executable, "-c", "pass"]], cwd=str(tmp_path / "was_here"))
    deadline = time.monotonic() + 30
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    (tmp_path / "was_here").rmdir()
    with pytest.raises(UserError, match=r"was_here: the folder this run was started from is gone; its commands name files "
                                        r"relative to it: make it again, or start the run anew"):
        jobs.start("train", "lora", [[sys.executable, "-c", "pass"]], resumed_from=job.id, cwd=job.cwd)
    assert [j.id for j in Jobs(tmp_path / "jobs").all()] == [job.id]
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [job.id]


FULL_DISK = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from command_runner import _mount_small_disk
jobs_folder = Path(sys.argv[1])
_mount_small_disk(jobs_folder, 256 * 1024)  # this process and its children: the supervisor, the command
from musubi_tuner.ui.jobs import Jobs
fill = ("import os\\ntry:\\n    with open(os.path.join(%r, 'fill'), 'wb') as f:\\n        while True:\\n"
        "            f.write(b'x' * 4096)\\n            f.flush()\\nexcept OSError:\\n    pass\\n" % str(jobs_folder))
jobs = Jobs(jobs_folder)
job = jobs.start("generate", "fills the disk", [[sys.executable, "-c", fill]])
deadline = time.monotonic() + 60
while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
    time.sleep(0.1)
again = Jobs(jobs_folder)  # a studio restarted on the full disk
print(json.dumps([[j.state, j.returncode] for j in (jobs.get(job.id), again.get(job.id))]))
"""


def test_a_job_that_ends_on_a_full_disk_under_the_jobs_folder_is_finished_not_lost(tmp_path):
    """F9 of the studio's fuzzing: with the jobs folder's disk full, the supervisor could not write how the job ended,
    the job became "lost ... how it ended is unknown", and the next list poll was a 400."""
    reliability = Path(__file__).resolve().parents[1] / "reliability"
    sys.path.insert(0, str(reliability))
    try:
        from command_runner import read_only_mounts_work
    finally:
        sys.path.remove(str(reliability))
    if not read_only_mounts_work():
        pytest.skip("needs a private mount namespace (root with CAP_SYS_ADMIN)")
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "jobs"), str(reliability)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [["finished", 0], ["finished", 0]], done.stderr[-3000:]


def test_progress_polls_read_what_was_appended_a_line_being_written_once_whole_and_a_rewritten_file_anew(tmp_path):
    """Each poll reads only what the command appended since the last (F20: a ten-hour run's file, re-read whole, cost
    0.22 s per poll and page); what it shows is what a whole read shows."""
    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("train", "t", [[sys.executable, "-c", "pass"]])
    path = jobs.path(job) / "progress.jsonl"
    record = lambda desc, n, **more: json.dumps({"desc": desc, "n": n, "time": n, **more})  # noqa: E731
    path.write_text(record("latents", 1) + "\n" + record("steps", 1) + "\n" + record("steps", 2)[:10])
    assert [(r["desc"], r["n"]) for r in jobs.progress(job)] == [("latents", 1), ("steps", 1)]
    with open(path, "a") as f:
        f.write(record("steps", 2)[10:] + "\n" + record("latents", 3, closed=True) + "\n")
    assert [(r["desc"], r["n"]) for r in jobs.progress(job)] == [("latents", 3), ("steps", 2)]  # (closed ones first)
    path.unlink()
    path.write_text(record("samples", 1) + "\n")  # a file written anew
    assert [(r["desc"], r["n"]) for r in jobs.progress(job)] == [("samples", 1)]
    assert Jobs(tmp_path / "jobs").progress(job) == jobs.progress(job)


def test_a_job_stopped_while_it_starts_does_not_run_on(tmp_path):
    """Stop pressed before the supervisor has started the command (the server knows no pid yet): the supervisor sees the
    request and interrupts its command itself, so the job ends stopped at once, not when the command ends."""
    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("generate", "sleeper", [[sys.executable, "-c", "import time; time.sleep(60)"]])
    jobs.stop(job.id)  # at once: the job is still "starting"
    deadline = time.monotonic() + 30
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs.get(job.id).state == "stopped" and time.monotonic() < deadline


def test_a_training_stopped_while_accelerate_starts_ends_in_one_line(tmp_path):
    """Stop pressed at once: a Ctrl-C reached `accelerate launch` while Python or accelerate started, and the job's log
    ended in a traceback of that start-up (three of four runs); a command that young is now killed."""
    from musubi_tuner.launch import training_command

    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("train", "stopped at once", [training_command(["--help"], quiet=True)])
    deadline = time.monotonic() + 60
    while jobs.get(job.id).state == "starting" and time.monotonic() < deadline:
        time.sleep(0.01)
    jobs.stop(job.id)
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    log = (tmp_path / "jobs" / job.id / "log.txt").read_text()
    assert jobs.get(job.id).state == "stopped" and "Traceback" not in log, log[-3000:]


def test_half_a_character_in_a_request_is_a_400_and_starts_no_job(tmp_path):
    """A page's JSON may carry a lone UTF-16 surrogate (half a pasted emoji): it was a 500 that still started a job,
    after which every listing of the jobs was a 500."""
    studio = client(tmp_path)
    values = {"prompt": "a cat \ud83d", "dit": "d", "vae": "v", "save_path": "v"}
    request_body = json.dumps({"command": "generate", "values": values}).encode()  # (ensure_ascii: "\\ud83d", as a page sends it)
    response = studio.post("/api/jobs", content=request_body, headers={**STUDIO, "Content-Type": "application/json"})
    assert response.status_code == 400 and "lone surrogate" in response.json()["error"], response.text
    listing = studio.get("/api/jobs")
    assert listing.status_code == 200 and listing.json()["jobs"] == [], listing.text
    deep = studio.post("/api/dataset/toml", content=b"[" * 100_000, headers=STUDIO)
    assert deep.status_code == 400, deep.text


def test_the_dataset_form_replaces_only_a_dataset_config_and_shows_only_one(tmp_path):
    """Save wrote TOML over any file of the workspace (a VAE, a job's record); Open showed any .json or .toml file (a
    credentials file, say) whole."""
    studio = client(tmp_path)
    ws = tmp_path / "ws"
    config = {"general": {"resolution": [64, 64], "caption_extension": ".txt"},
              "datasets": [{"image_directory": "imgs", "cache_directory": "cache"}]}
    (ws / "imgs").mkdir(parents=True)
    model = ws / "vae.pt"
    model.write_bytes(b"PK\x03\x04 weights")
    secret = ws / "settings.toml"
    secret.write_text('token = "s3cr3t"\n')
    for path, error in (("vae.pt", "ending in .toml"), ("settings.toml", "not a dataset config"), ("x.json", "ending in .toml")):
        response = studio.post("/api/dataset/save", json={"path": path, "config": config}, headers=STUDIO)
        assert response.status_code == 400 and error in response.json()["error"], (path, response.text)
    assert model.read_bytes() == b"PK\x03\x04 weights" and secret.read_text() == 'token = "s3cr3t"\n'
    shown = studio.get("/api/dataset", params={"path": str(secret)})
    assert shown.status_code == 400 and "s3cr3t" not in shown.text, shown.text
    for _ in range(2):  # a new config, then the same one replaced
        saved = studio.post("/api/dataset/save", json={"path": "mine.toml", "config": config}, headers=STUDIO)
        assert saved.status_code == 200, saved.text


def test_files_are_served_as_files_never_as_pages_of_the_studio(tmp_path):
    """An .svg or .html in the workspace, opened through a link, would run its script on the studio's origin."""
    studio = client(tmp_path)
    (tmp_path / "ws").mkdir(parents=True, exist_ok=True)
    (tmp_path / "ws" / "x.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("/api/jobs")</script></svg>')
    served = studio.get("/files", params={"path": "x.svg"})
    assert served.status_code == 200 and served.headers["x-content-type-options"] == "nosniff"
    assert served.headers["content-security-policy"].startswith("sandbox")
    assert studio.get("/files", params={"path": "d" * 5000}).status_code in (400, 403)


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").exists(), reason="process identities come from Linux's /proc")
def test_a_job_whose_pid_is_now_another_programs_is_lost_and_stop_leaves_that_program_alone(tmp_path):
    """After a reboot (or a wrap-around of pids) a job left "running" names pids that now belong to other programs: the
    job showed "running" for ever, and Stop killed the unrelated program's process group."""
    from musubi_tuner.ui.jobs import _identity, save_job

    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("generate", "ends at once", [[sys.executable, "-c", "pass"]])
    deadline = time.monotonic() + 60
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    recorded = jobs.get(job.id)
    assert recorded.pid_identity and recorded.supervisor_identity  # what each pid was when the job started it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        # the record as a machine that went down mid-run leaves it, the pids since given to another program
        folder = tmp_path / "jobs" / job.id
        stale = Jobs(tmp_path / "jobs").get(job.id)
        stale.state, stale.pid, stale.supervisor, stale.ended = "running", other.pid, other.pid, None
        save_job(folder, stale)
        assert Jobs(tmp_path / "jobs").get(job.id).state == "lost"
        # a live supervisor (this process stands for it), its command's pid since given to another program
        stale.state, stale.supervisor, stale.supervisor_identity = "running", os.getpid(), _identity(os.getpid())
        save_job(folder, stale)
        restarted = Jobs(tmp_path / "jobs")
        assert restarted.get(job.id).state == "running"
        restarted.stop(job.id)
        time.sleep(1)
        assert other.poll() is None, "Stop signalled a process that is not the job's"
    finally:
        other.kill()
        other.wait()


def _started_studio(workspace: Path) -> tuple[subprocess.Popen, int]:
    """`python -m musubi_tuner.ui` on a free port, once it answers (its stderr piped for the test), and the port."""
    import urllib.request

    from helpers import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "musubi_tuner.ui", "--workspace", str(workspace), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the studio did not start: {server.communicate()[1][-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs", timeout=5)
            return server, port
        except OSError:
            time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory in /proc")
def test_an_upload_is_written_as_it_arrives_not_held_whole_in_the_studios_memory(tmp_path):
    """F20 of the studio's fuzzing: a 300 MB upload took the studio from 333 MB to 919 MB (the body read whole, then
    copied); a V2V source of several GB needed several times its size in memory."""
    import http.client

    size = 256 << 20
    source = tmp_path / "clip.mp4"
    with open(source, "wb") as f:
        f.truncate(size)  # (a sparse file: the test process holds none of it either)
    server, port = _started_studio(tmp_path / "ws")
    peak = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{server.pid}/status").read_text())[1]) << 10  # noqa: E731
    try:
        before = peak()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        with open(source, "rb") as body:
            connection.request("POST", "/api/upload?name=clip.mp4", body=body, headers={**STUDIO, "Content-Length": str(size)})
        reply = connection.getresponse()
        assert reply.status == 200, reply.read()
        uploaded = Path(json.loads(reply.read())["path"])
        grown = peak() - before
    finally:
        server.kill()
        server.communicate()
    assert uploaded.stat().st_size == size
    assert grown < size // 4, f"the studio's peak memory grew by {grown >> 20} MiB for a {size >> 20} MiB upload"


@pytest.mark.parametrize("sig, said", [("SIGHUP", "hung up"), ("SIGTERM", "terminated"), ("SIGINT", "interrupted")])
def test_the_studio_stops_on_a_signal_in_one_line_with_the_signals_status(tmp_path, sig, said):
    """SIGHUP (a closed terminal) was a traceback inside a request, and at times left the studio serving; SIGTERM and
    Ctrl-C ended it with status 0 and no word."""
    import signal

    server, _ = _started_studio(tmp_path / "ws")
    try:
        number = getattr(signal, sig)
        server.send_signal(number)
        err = server.communicate(timeout=60)[1]
    finally:
        server.kill()
    assert "Traceback" not in err and err.strip().splitlines()[-1:] == [said], err
    assert server.returncode == 128 + number


def test_a_runs_page_shows_its_own_files_only(tmp_path):
    """Files were found by a prefix glob: run "lora" listed "lora-big"'s, a name with [ ] listed none, and a generation
    showed every video written into its --save_path since it started, another job's among them."""
    from musubi_tuner.ui.run_view import RunViews

    out = tmp_path / "out"
    out.mkdir()
    for name in ("lora.safetensors", "lora.comfyui.safetensors", "lora-000002.safetensors", "lora-step00000010.safetensors",
                 "lora-big.safetensors", "lora-big.comfyui.safetensors", "style[v2].safetensors"):
        (out / name).write_bytes(b"x")
    assert sorted(p.name for p in RunViews.lora_files(out, "lora")) == [
        "lora-000002.safetensors", "lora-step00000010.safetensors", "lora.comfyui.safetensors", "lora.safetensors"]
    assert [p.name for p in RunViews.lora_files(out, "style[v2]")] == ["style[v2].safetensors"]

    jobs = Jobs(tmp_path / "jobs")
    videos = tmp_path / "videos"
    videos.mkdir()
    mine, other = videos / "20261205-101010-111_0_1.mp4", videos / "20261205-101011-222_0_2.mp4"
    for path in (mine, other):
        path.write_bytes(b"mp4")
    job = jobs.start("generate", "a cat", [[sys.executable, "-c", f"print('saved {mine}')"]], {"save_path": str(videos)})
    deadline = time.monotonic() + 60
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert RunViews(Workspace(tmp_path / "ws"), jobs)._saved(jobs.get(job.id)) == [str(mine)]


def test_a_training_job_shows_its_folders_curve_and_files_only_once_it_trains(tmp_path):
    """fuzz_at 3: a job refused because a shell run held its --output_dir showed that run's loss curve and LoRA files,
    each with a doctor's report, as its own: a failed job's page looked like a finished run."""
    from musubi_tuner.ui.run_view import RunViews

    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"x")
    (out / "lora-loss.csv").write_text("kind,step,loss\ntrain,1,0.5\ntrain,2,0.25\n")
    jobs = Jobs(tmp_path / "jobs")
    views = RunViews(Workspace(tmp_path / "ws"), jobs)
    outputs = {"output_dir": str(out), "output_name": "lora"}
    refused = "import sys; sys.exit('error: out: another training run is using this')"
    trains = "from musubi_tuner.progress import progress_bar; bar = progress_bar(total=2, desc='steps'); bar.update(2); bar.close()"
    shown = []
    for script in (refused, trains):
        job = jobs.start("train", "lora", [[sys.executable, "-c", script]], outputs)
        deadline = time.monotonic() + 60
        while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        detail = views.detail(jobs.get(job.id))
        shown.append((detail["curve"]["train"], [f["name"] for f in detail["files"]]))
    assert shown == [([], []), ([(1, 0.5), (2, 0.25)], ["lora.safetensors"])]


def test_a_dataset_config_saved_by_a_relative_path_opens_by_that_path(tmp_path):
    """Save took a relative path inside the workspace, Open and Cache from the studio's own folder: right after a Save,
    Cache said the file was not found."""
    studio = client(tmp_path)
    (tmp_path / "ws" / "imgs").mkdir(parents=True)
    config = {"general": {"resolution": [64, 64], "caption_extension": ".txt"},
              "datasets": [{"image_directory": "imgs", "cache_directory": "cache"}]}
    assert studio.post("/api/dataset/save", json={"path": "mine.toml", "config": config}, headers=STUDIO).status_code == 200
    opened = studio.get("/api/dataset", params={"path": "mine.toml"})
    assert opened.status_code == 200 and opened.json()["exists"] and opened.json()["path"] == str(tmp_path / "ws" / "mine.toml")


def test_a_path_the_system_refuses_is_a_400_naming_it_and_a_huge_value_is_not_echoed_whole(tmp_path):
    studio = client(tmp_path)
    long = studio.get("/api/dataset", params={"path": "d" * 5000 + ".toml"})
    assert long.status_code == 400 and "name too long" in long.json()["error"].lower(), long.text
    assert len(long.text) < 3000
    assert studio.post("/api/upload", params={"name": ".."}, content=b"x", headers=STUDIO).status_code == 400


def test_the_job_list_is_newest_first_past_nine_jobs_in_a_second_and_a_prompt_too_long_for_a_command_line_is_a_400(tmp_path):
    jobs = Jobs(tmp_path / "jobs")
    started = [jobs.start("generate", f"job {i}", [[sys.executable, "-c", f"pass  # {i}"]]) for i in range(11)]
    listed = [j.id for j in jobs.all()]
    assert listed[0] == started[-1].id, listed  # ("-11-" sorted before "-9-" as text)
    values = {"prompt": "x" * 200_000, "dit": "d", "vae": "v", "save_path": "v"}
    refused = client(tmp_path).post("/api/jobs", json={"command": "generate", "values": values}, headers=STUDIO)
    assert refused.status_code == 400 and "--prompt: over 128 KB" in refused.json()["error"], refused.text[:300]


def test_a_stop_of_a_job_whose_supervisor_was_killed_ends_it_stopped_not_lost(tmp_path):
    import signal

    jobs = Jobs(tmp_path / "jobs")
    job = jobs.start("generate", "sleeper", [[sys.executable, "-c", "import time; time.sleep(60)"]])
    deadline = time.monotonic() + 60
    while jobs.get(job.id).pid is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(jobs.get(job.id).supervisor, signal.SIGKILL)  # the OOM killer, say
    time.sleep(6)  # the command is past its start: Stop interrupts it
    jobs.stop(job.id)
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs.get(job.id).state == "stopped"


def test_a_misspelt_form_key_is_a_400_naming_the_one_meant(tmp_path):
    """It was ignored: `learning_rat` ran with the default learning rate."""
    values = {**train_values("runs"), "learning_rat": "1e-2"}
    refused = client(tmp_path).post("/api/command/train", json={"values": values}, headers=STUDIO)
    assert refused.status_code == 400 and refused.json()["error"] == "unknown option 'learning_rat' (did you mean learning_rate?)"


def test_a_port_in_use_is_named_before_any_address_is_printed_and_a_stop_waits_a_bounded_time(tmp_path):
    """fuzz_ac 6: the studio printed "studio at http://127.0.0.1:PORT/" (another studio's address, on another workspace),
    then uvicorn's own ERROR line; fuzz_ac 7: a stalled upload held Ctrl-C and SIGTERM off for as long as its client
    kept the connection."""
    import signal
    import socket

    server, port = _started_studio(tmp_path / "ws")
    try:
        second = subprocess.run([sys.executable, "-m", "musubi_tuner.ui", "--workspace", str(tmp_path / "ws2"), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "studio at" not in second.stdout, second
        assert second.stderr.strip() == (f"error: --port {port}: in use on 127.0.0.1 (another studio, or another program); "
                                         "choose another --port")
        assert not (tmp_path / "ws2" / "demo").exists()  # (nothing written for a studio that cannot start)
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"POST /api/upload?name=slow.mp4 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Musubi-Studio: 1\r\n"
                        b"Content-Length: 10000000\r\n\r\n" + b"x" * 1000)
        time.sleep(1)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        from musubi_tuner.ui.server import GRACE_SECONDS

        assert time.monotonic() - started < GRACE_SECONDS + 10
        stalled.close()
    finally:
        server.kill()
        server.communicate()


def test_a_json_body_past_the_limit_is_refused_before_it_is_read(tmp_path):
    """fuzz_ac 8: a 200 MB body took the studio from 350 MB to 936 MB, and it stayed at 740 MB."""
    from musubi_tuner.ui.app import MAX_BODY_BYTES

    studio = client(tmp_path)
    big = b'{"values": {"prompt": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}}'
    refused = studio.post("/api/command/generate", content=big, headers={**STUDIO, "Content-Type": "application/json"})
    assert refused.status_code == 413 and refused.json()["error"].startswith("the request is over 16 MiB")


def test_a_damaged_job_json_is_left_out_of_the_runs_and_a_deleted_run_leaves_the_list(tmp_path, caplog):
    """fuzz_ac 9: a job.json with "started": null made every page's run list a 500 (a sort of None against floats), and
    it stayed so after the folder was deleted, until a restart; an unknown run was "not found: 'output_dir'"."""
    import shutil

    studio, deadline0 = client(tmp_path), time.monotonic()
    jobs_folder = tmp_path / "ws" / "jobs"
    good = Jobs(jobs_folder).start("generate", "a cat", [[sys.executable, "-c", "pass"]], {"save_path": str(tmp_path / "ws" / "v")})
    damages = ({"started": None}, {"commands": "rm -rf /"}, {"outputs": {"output_dir": 3}}, {"pid": "12"},
               {"started": float("nan")}, {"commands": []})  # (the last two: fuzz_be 5)
    for i, damage in enumerate(damages):
        job_id = f"20200101-000000-{i + 1}-train"
        (jobs_folder / job_id).mkdir()
        record = {"id": job_id, "kind": "train", "title": "t", "commands": [["true"]], "state": "finished", "started": 1.0,
                  "outputs": {"output_dir": "o", "output_name": "n"}, **damage}
        (jobs_folder / job_id / "job.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        listed = studio.get("/api/jobs")
    assert listed.status_code == 200 and [j["id"] for j in listed.json()["jobs"]] == [good.id], listed.text
    assert caplog.text.count("not a job this studio can read (damaged, or another version's): left out of the runs") == 6
    nameless = Jobs(jobs_folder).start("train", "t", [[sys.executable, "-c", "pass"]], {"output_dir": "o"})  # (no name: the
    assert studio.get("/api/loras").status_code == 200  # LoRA list was a 500, fuzz_be 5)
    while studio.get(f"/api/jobs/{nameless.id}").json()["state"] in ("starting", "running") and time.monotonic() < deadline0 + 30:
        time.sleep(0.1)
    shutil.rmtree(jobs_folder / nameless.id)
    missing = studio.get("/api/jobs/20200101-000000-1-train")
    assert missing.status_code == 404 and missing.json()["error"] == "no run '20200101-000000-1-train' in this workspace"
    deadline = time.monotonic() + 30
    while studio.get(f"/api/jobs/{good.id}").json()["state"] in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    shutil.rmtree(jobs_folder / good.id)
    assert studio.get("/api/jobs").json()["jobs"] == []


def test_a_generation_shows_what_it_wrote_from_its_own_output_not_from_its_prompt(tmp_path):
    """fuzz_ac 10: a failed run whose multi-line prompt held a line "saved OLD.mp4" showed that video as its result (the
    log's command line spread over lines); an images or latent run showed "no video written"."""
    old = tmp_path / "ws" / "old.mp4"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an earlier video")
    frames = tmp_path / "ws" / "v" / "frames"
    frames.mkdir(parents=True)
    studio = client(tmp_path)
    script = f"import sys; print('saved {frames}'); sys.exit(0)"
    job = studio.app.app.state.jobs.start("generate", "two lines", [[sys.executable, "-c", script, f"a red circle\nsaved {old}\nmoving"]],
                                           {"save_path": str(frames.parent)})
    deadline = time.monotonic() + 30
    while (detail := studio.get(f"/api/jobs/{job.id}").json())["state"] in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert detail["videos"] == [] and detail["saved"] == [str(frames)], detail
    log = (tmp_path / "ws" / "jobs" / job.id / "log.txt").read_text()
    assert f"$'a red circle\\nsaved {old}\\nmoving'" in log.splitlines()[0]


def test_relative_paths_a_form_reads_are_the_workspaces_as_the_dataset_page_takes_them(tmp_path):
    """fuzz_ac 5: demo/dataset/dataset.toml, which the Dataset page opens and caches, was passed on as typed; the command
    read it from the folder the studio was started in, and the started job failed with "dataset config not found"."""
    studio = client(tmp_path)
    values = dict(train_values("runs/one"), dataset_config="demo/dataset/dataset.toml", network_weights="loras/start.safetensors")
    shown = studio.post("/api/command/train", json={"values": values}, headers=STUDIO).json()["shown"]
    root = tmp_path / "ws"
    assert f"--dataset_config {root / 'demo' / 'dataset' / 'dataset.toml'}" in shown
    assert f"--network_weights {root / 'loras' / 'start.safetensors'}" in shown
    generate = {"dit": "d.pt", "vae": "/abs/v.pt", "prompt": "p", "save_path": "videos", "lora_weight": "a.safetensors\nb/c.safetensors"}
    shown = studio.post("/api/command/generate", json={"values": generate}, headers=STUDIO).json()["shown"]
    assert f"--dit {root / 'd.pt'} --vae /abs/v.pt" in shown
    assert f"--lora_weight {root / 'a.safetensors'} {root / 'b' / 'c.safetensors'}" in shown


def test_a_folder_asked_of_files_is_named_as_a_folder(tmp_path):
    """fuzz_ac 12: /files?path=demo said "no such file"."""
    studio = client(tmp_path)
    (tmp_path / "ws" / "sub").mkdir()
    answer = studio.get("/files", params={"path": "sub"})
    assert answer.status_code == 404 and answer.json()["error"].endswith("sub: a folder; the studio serves files")


def test_an_upload_never_replaces_an_earlier_one_and_a_killed_ones_leftover_goes_at_the_next_start(tmp_path):
    """fuzz_ac 3: a second image.png replaced the first without a word (an earlier generation's command then named
    another image); fuzz_ac 2: an upload the studio was killed in left uploads/.NAME.PID-xxxx.tmp for good."""
    studio = client(tmp_path)
    uploads = tmp_path / "ws" / "uploads"
    first = studio.post("/api/upload", params={"name": "image.png"}, content=b"first", headers=STUDIO).json()["path"]
    second = studio.post("/api/upload", params={"name": "sub/image.png"}, content=b"second", headers=STUDIO).json()["path"]
    again = studio.post("/api/upload", params={"name": "image.png"}, content=b"first", headers=STUDIO).json()["path"]
    assert (first, second, again) == (str(uploads / "image.png"), str(uploads / "image-1.png"), str(uploads / "image.png"))
    assert (uploads / "image.png").read_bytes() == b"first" and (uploads / "image-1.png").read_bytes() == b"second"
    assert sorted(p.name for p in uploads.iterdir()) == ["image-1.png", "image.png"]
    writer = subprocess.Popen([sys.executable, "-c", "pass"])  # (a writer that is no more, as the killed studio)
    writer.wait()
    gone = writer.pid
    leftover = uploads / f".big.mp4.{gone}-ab12cd34.tmp"  # (the name atomic_write gives a file it writes)
    leftover.write_bytes(b"x" * 1000)
    client(tmp_path)
    assert not leftover.exists()


def test_inspect_of_a_dataset_with_a_file_name_that_is_not_utf8_lists_it(tmp_path):
    """fuzz_bc 3: an image named in Latin-1 (caf\xe9.png, from an old archive) made the whole Inspect a 500 on every poll:
    its name, held as Python's surrogate escape, could not be encoded as UTF-8 JSON. It is listed, and its name comes
    back in a request as the same file's."""
    from musubi_tuner.demo.synthetic_data import make_synthetic_dataset

    toml = make_synthetic_dataset(tmp_path / "data", num_videos=0, num_images=1)
    images = tmp_path / "data" / "images"
    latin = os.fsdecode(b"caf\xe9")
    shutil.copy(images / "image_0000.png", images / f"{latin}.png")
    (images / f"{latin}.txt").write_text("a cafe")
    studio = client(tmp_path)
    task = studio.post("/api/dataset/inspect", json={"path": str(toml)}, headers=STUDIO).json()["task"]
    deadline = time.monotonic() + 60
    while (state := studio.get(f"/api/tasks/{task}")).status_code == 200 and state.json()["state"] == "running" \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.status_code == 200, state.text
    (dataset,) = state.json()["result"]["datasets"]
    names = [Path(item["path"]).name for item in dataset["items"]]
    assert f"{latin}.png" in names and "image_0000.png" in names
    assert os.path.isfile(next(item["path"] for item in dataset["items"] if item["path"].endswith(f"{latin}.png")))


def test_the_lora_doctor_works_beside_inspect_and_plan_not_in_their_pool(tmp_path):
    """fuzz_ac 11: a doctor task per LoRA file of an opened run went to the two workers of Inspect and Plan (a Plan took
    11 s instead of 6 after two runs of 140 files were opened), and every report was kept for the life of the studio."""
    import threading

    from safetensors.torch import save_file

    from helpers import tiny_dit_file_and_lora
    from musubi_tuner.ui.app import Studio

    studio = Studio(Workspace(tmp_path / "ws"))
    _, weights, _ = tiny_dit_file_and_lora(tmp_path)
    lora = tmp_path / "lora.safetensors"
    save_file(weights, str(lora))
    busy = threading.Event()
    for _ in range(2):  # an Inspect and a Plan hold both of the studio's workers
        studio.tasks.submit(busy.wait, 60)
    try:
        deadline = time.monotonic() + 60
        while (verdict := studio.views._with_doctor(lora)["doctor"]) == "checking..." and time.monotonic() < deadline:
            time.sleep(0.1)
        assert isinstance(verdict, dict) and "text" in verdict, verdict
    finally:
        busy.set()
    first = studio.views._doctor[str(lora)][1]
    os.utime(lora, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new version of the file
    studio.views._with_doctor(lora)
    assert first not in studio.views.doctor_tasks.futures and len(studio.views.doctor_tasks.futures) == 1


def test_the_same_generation_twice_is_refused_while_it_runs(tmp_path):
    """fuzz_ao 2: a double click on Generate started two runs of one command (the same seed, the same folder)."""
    jobs = Jobs(tmp_path / "jobs")
    slow = [sys.executable, "-c", "import time; time.sleep(20)"]
    first = jobs.start("generate", "a cat", [slow], {"save_path": str(tmp_path / "videos")})
    try:
        with pytest.raises(UserError, match=f"job {first.id} runs this same generation"):
            jobs.start("generate", "a cat", [slow], {"save_path": str(tmp_path / "videos")})
        other = jobs.start("generate", "a cat", [[*slow[:-1], slow[-1] + " "]], {"save_path": str(tmp_path / "videos")})
        jobs.stop(other.id)
    finally:
        jobs.stop(first.id)


def test_the_dataset_page_is_given_the_caching_of_the_config_it_shows(tmp_path):
    """fuzz_ao 4: the Cache panel showed the newest caching job of any config, above another config's items."""
    studio = client(tmp_path)
    workspace = tmp_path / "ws"
    jobs = Jobs(workspace / "jobs")
    done = [sys.executable, "-c", "print(1)"]
    mine = jobs.start("cache", "cache a.toml", [done], {"dataset_config": str(workspace / "a.toml")})
    jobs.start("cache", "cache b.toml", [done], {"dataset_config": str(workspace / "b.toml")})
    listed = studio.get("/api/jobs", params={"kind": "cache", "dataset_config": "a.toml"}).json()["jobs"]
    assert [j["id"] for j in listed] == [mine.id]
    assert len(studio.get("/api/jobs", params={"kind": "cache"}).json()["jobs"]) == 2


def test_a_long_log_is_shown_from_a_line_start_says_how_much_is_above_and_links_the_whole_file(tmp_path):
    """fuzz_ao 3: the run panel showed the log's last 12 KB as the whole log, cut mid-line (mid-character in a bar)."""
    studio = client(tmp_path)
    script = "for i in range(2000): print(f'line {i:04d} ' + '\u2588' * 3)"  # 18 bytes a line, a 3-byte character
    job = studio.app.app.state.jobs.start("cache", "long", [[sys.executable, "-c", script]])
    deadline = time.monotonic() + 30
    while (detail := studio.get(f"/api/jobs/{job.id}").json())["state"] in ("starting", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    whole = studio.get("/files", params={"path": detail["log_path"]})
    assert whole.status_code == 200 and whole.text.startswith("$ python -c ")
    shown = detail["log"]
    assert "\ufffd" not in shown and shown.startswith("line ") and whole.text.endswith(shown)
    assert detail["log_skipped"] == len(whole.content) - len(shown.encode()) > 0


def test_an_input_that_is_not_there_is_said_under_the_command_and_start_refuses_it_naming_the_flag(tmp_path):
    """fuzz_ao 5: a missing --dit or --dataset_config was the command's own error, in a failed job seconds after Start."""
    studio, ws = client(tmp_path), tmp_path / "ws"
    inputs_there(ws, "d.pt")
    values = train_values("runs")  # --dit d.pt is there, --dataset_config x.toml is not
    box = studio.post("/api/command/train", json={"values": values}, headers=STUDIO).json()
    assert box["missing"] == [f"{ws / 'x.toml'}: file not found (--dataset_config)"] and "--dataset_config" in box["shown"]
    refused = studio.post("/api/jobs", json={"command": "train", "values": values}, headers=STUDIO)
    assert (refused.status_code, refused.json()["error"]) == (400, box["missing"][0])
    assert studio.get("/api/jobs").json()["jobs"] == []
    generate = {"prompt": "p", "dit": "d.pt", "vae": "d.pt", "save_path": "videos", "lora_weight": "d.pt\nlora/gone.safetensors"}
    box = studio.post("/api/command/generate", json={"values": generate}, headers=STUDIO).json()
    assert box["missing"] == [f"{ws / 'lora' / 'gone.safetensors'}: file not found (--lora_weight)"]
    resume_auto = studio.post("/api/command/train", json={"values": {**values, "dataset_config": "d.pt", "resume": "auto"}},
                              headers=STUDIO).json()
    assert resume_auto["missing"] == [] and "--resume auto" in resume_auto["shown"]  # (it was the workspace's "auto" folder)


def test_a_video_size_that_is_not_a_multiple_of_16_is_refused_as_the_command_line_is_read(tmp_path):
    """fuzz_ao 5: the command box showed --video_size 65 65 as a valid command; the job failed seconds after Start."""
    studio = client(tmp_path)
    box = studio.post("/api/command/generate", json={"values": {"prompt": "p", "dit": "d", "vae": "v", "save_path": "v",
                                                                "video_size": "65 65"}}, headers=STUDIO)
    assert (box.status_code, box.json()["error"]) == (400, "--video_size 65 65: height and width must be multiples of 16 (try 64 64)")


def test_uploads_of_one_name_at_once_each_keep_their_file(tmp_path):
    """fuzz_bc 11: two uploads of one name at the same moment (two tabs; pasted images are all "image.png") both took
    uploads/image.png, which held only one of them, and both answers named it."""
    import threading

    studio = client(tmp_path)
    bodies = [bytes([i]) * 200_000 for i in range(6)]
    answers: dict[int, str] = {}
    start = threading.Barrier(len(bodies))

    def upload(i: int) -> None:
        start.wait()
        answers[i] = studio.post("/api/upload", params={"name": "image.png"}, content=bodies[i], headers=STUDIO).json()["path"]

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(set(answers.values())) == len(bodies)
    assert all(Path(answers[i]).read_bytes() == bodies[i] for i in range(len(bodies)))
    assert sorted(p.name for p in (tmp_path / "ws" / "uploads").iterdir()) == sorted(Path(a).name for a in answers.values())


def test_the_dataset_pages_models_are_the_workspaces_and_checked_before_caching_starts(tmp_path, monkeypatch):
    """fuzz_ba 6: the Dataset page's --vae/--text_encoder1/--text_encoder2 went to the job as typed: a path relative to the
    workspace (as the config beside them is read) was "not found" in a job already started, and a missing or empty one
    started a job that failed; a command form's ~/ model path was passed on unexpanded and called "not found"."""
    from musubi_tuner.demo.synthetic_data import make_synthetic_dataset

    workspace = tmp_path / "ws"
    make_synthetic_dataset(workspace / "ds", num_videos=0, num_images=1)
    (workspace / "models" / "te1").mkdir(parents=True)
    (workspace / "models" / "te2").mkdir()
    (workspace / "models" / "vae.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # (the studio's folder is not the workspace)
    studio = client(tmp_path)
    started = studio.post("/api/dataset/cache", json={"toml": "ds/dataset.toml", "vae": "models/vae.pt", "te1": "models/te1",
                                                      "te2": "models/te2"}, headers=STUDIO).json()
    latents, text = started["commands"]
    assert latents[latents.index("--vae") + 1] == str(workspace / "models" / "vae.pt")
    assert text[text.index("--text_encoder2") + 1] == str(workspace / "models" / "te2")
    studio.post(f"/api/jobs/{started['id']}/stop", headers=STUDIO)
    refused = studio.post("/api/dataset/cache", json={"toml": "ds/dataset.toml", "vae": "models/none.pt", "te1": "",
                                                      "te2": "models/te2"}, headers=STUDIO)
    assert refused.status_code == 400 and refused.json()["error"] == (
        f"{workspace / 'models' / 'none.pt'}: VAE checkpoint not found (--vae); --text_encoder1: empty; give the text "
        "encoder's path")
    monkeypatch.setenv("HOME", str(workspace))
    assert Workspace(workspace).resolve("~/models/vae.pt") == str(workspace / "models" / "vae.pt")


def test_stop_pressed_again_while_a_command_stops_sends_no_second_ctrl_c_and_a_job_whose_folder_is_gone_still_stops(tmp_path):
    """fuzz_be 1: Stop pressed twice (a double click, two tabs) sent Ctrl-C into the command's clean-up from the first: a
    traceback in its log, its lock and a temporary file left behind. fuzz_be 2: a job whose folder was deleted while it
    ran could not be stopped ("stop-requested: No such file or directory"), and it ran on."""
    from musubi_tuner.ui.jobs import STARTING_SECONDS, _group_alive

    jobs = Jobs(tmp_path / "jobs")
    said = tmp_path / "interrupts.txt"
    script = ("import signal, sys, time\n"
              f"def interrupted(*_):\n    open({str(said)!r}, 'a').write('INT\\n')\n"
              "def first(*_):\n    interrupted()\n    signal.signal(signal.SIGINT, interrupted)\n"
              "    time.sleep(2)\n    sys.exit(1)\n"  # (a clean-up that takes a while, as a training's)
              "signal.signal(signal.SIGINT, first)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    started = time.monotonic()
    job = jobs.start("train", "t", [[sys.executable, "-c", script]])
    deadline = started + 30
    while "ready" not in jobs.log_tail(job) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(max(0.0, started + STARTING_SECONDS + 1 - time.monotonic()))  # (a command past its start is interrupted)
    for _ in range(3):
        jobs.stop(job.id)
    while jobs.get(job.id).state in ("starting", "running") and time.monotonic() < deadline + 30:
        time.sleep(0.1)
    assert said.read_text() == "INT\n"

    said.unlink()
    started = time.monotonic()
    other = jobs.start("train", "t", [[sys.executable, "-c", script]])
    deadline = started + 30
    while "ready" not in jobs.log_tail(other) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(max(0.0, started + STARTING_SECONDS + 1 - time.monotonic()))
    pid = jobs.get(other.id).pid
    shutil.rmtree(jobs.path(other))
    for _ in range(3):  # (once signalled: where the marker cannot be written, the studio remembers it: fuzz_bf 3)
        jobs.stop(other.id)
    deadline = time.monotonic() + 30
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pid) and said.read_text() == "INT\n"


def test_a_recorded_pid_without_an_identity_is_no_process_the_studio_signals():
    """fuzz_be 3: a job.json whose pid had no identity (another system's, or one read back after a reboot) had Stop send
    Ctrl-C, then SIGKILL, to whatever process group had that pid now; the job showed as running for good."""
    from musubi_tuner.ui.jobs import Job, _command_alive, _identity

    me = os.getpid()
    if _identity(me) is None:
        pytest.skip("this system tells no process identities (Linux's /proc)")
    job = Job("j", "train", "t", [], {}, pid=me, pid_identity=_identity(me))
    assert _command_alive(job)
    job.pid_identity = None
    assert not _command_alive(job)
    job.pid_identity = "another-boot/1"
    assert not _command_alive(job)


def test_stalled_uploads_leave_the_other_endpoints_answering(tmp_path):
    """fuzz_be 4: an upload held a worker of the pool every endpoint runs in for as long as its client kept the connection:
    forty stalled ones (a slow network, one client) and every endpoint, Stop included, waited."""
    import socket
    import urllib.request

    server, port = _started_studio(tmp_path / "ws")
    stalled = []
    try:
        for _ in range(45):  # (more than the pool's 40 workers)
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"POST /api/upload?name=big.mp4 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Musubi-Studio: 1\r\n"
                               b"Content-Length: 1000000\r\n\r\nx")
            stalled.append(connection)
        time.sleep(2)  # (each upload's handler taken up)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs", timeout=20) as answer:
            assert answer.status == 200 and json.loads(answer.read()) == {"jobs": []}
        assert time.monotonic() - started < 10
    finally:
        for connection in stalled:
            connection.close()
        server.terminate()
        server.wait(timeout=30)


def test_an_upload_of_a_long_name_is_shortened_and_a_blank_name_or_an_empty_file_is_refused(tmp_path):
    """fuzz_be 11: a 240-byte name (one the page cannot change) was refused for its temporary file's length; a name of one
    space was taken as a file " "; an empty upload was stored, to fail later as --image_path."""
    studio = client(tmp_path)
    long = studio.post("/api/upload", params={"name": "x" * 250 + ".png"}, content=b"png", headers=STUDIO).json()["path"]
    assert Path(long).name == "x" * 236 + ".png" and Path(long).read_bytes() == b"png"
    blank = studio.post("/api/upload", params={"name": " "}, content=b"png", headers=STUDIO)
    assert blank.status_code == 400 and blank.json()["error"] == "upload: no file name"
    empty = studio.post("/api/upload", params={"name": "empty.png"}, content=b"", headers=STUDIO)
    assert empty.status_code == 400 and empty.json()["error"] == "upload empty.png: the file is empty; nothing was written"
    suffix = studio.post("/api/upload", params={"name": "x." + "a" * 300}, content=b"png", headers=STUDIO).json()["path"]
    assert Path(suffix).name == "x." + "a" * 238  # (a "suffix" of no type: cut as the name; kept, it left nothing: fuzz_bf 4)
    assert sorted(p.name for p in (tmp_path / "ws" / "uploads").iterdir()) == sorted([Path(long).name, Path(suffix).name])

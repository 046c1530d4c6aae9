"""What the train and generate pages show of a job: its progress (with the ETA its progress bar computes), the loss
and validation curve from the run's loss CSV, the sample grids, the LoRA files with the LoRA doctor's verdict, the
videos written."""

from __future__ import annotations

import time
from pathlib import Path

from musubi_tuner.ui.jobs import Job, Jobs
from musubi_tuner.ui.workspace import Workspace


class RunViews:
    def __init__(self, workspace: Workspace, jobs: Jobs):
        from musubi_tuner.ui.app import Tasks

        self.workspace, self.jobs = workspace, jobs
        # the doctor checks every LoRA file of a run in its own worker: in the pool of Inspect and Plan, a run of a hundred
        # saves delayed them by minutes (fuzz_ac 11)
        self.doctor_tasks = Tasks(workers=1, name="doctor")
        self._doctor: dict[str, tuple[int, str]] = {}  # file -> (mtime_ns, task id) of its latest version

    def detail(self, job: Job) -> dict:
        skipped, log = self.jobs.log_end(job)
        out = {**self.jobs.summary(job), "log": log, "log_skipped": skipped, "log_path": str(self.jobs.path(job) / "log.txt"),
               "progress": self.jobs.progress(job)}
        if job.kind == "train":
            out["resumable"] = self.resumable(job, out["progress"])
        if job.kind == "train" and {"output_dir", "output_name"} <= set(job.outputs):  # (a job.json without them: none)
            # its folder's curve and files once it trains: a job refused because another run held the folder showed
            # that run's as its own (fuzz_at 3)
            trained = self.trained(job, out["progress"])
            out.update(self._training(job) if trained else {"curve": {"train": [], "validation": []}, "samples": [], "files": []})
        elif job.kind == "generate":
            out["saved"] = self._saved(job)
            out["videos"] = [p for p in out["saved"] if p.endswith(".mp4")]
        return out

    def trained(self, job: Job, progress: list[dict] | None = None) -> bool:
        """Whether the job's training command reached its steps (its "steps" bar): one refused before them (another run
        held its folder, a flag was wrong) has nothing of its own to show."""
        return any(bar.get("desc") == "steps" for bar in (self.jobs.progress(job) if progress is None else progress))

    def resumable(self, job: Job, progress: list[dict] | None = None) -> bool:
        """Whether Resume has something to continue: the job reached its steps, or it is itself a Resume and its run's
        folder holds a state of the run (stopped while its model loaded, it lost its button, and the Train page's Start
        trained over that run from step 0: fuzz_bf 1). A fresh Start stopped so has nothing of its own: the states there
        are an earlier run's, which its Resume continued (fuzz_bg 3)."""
        if job.kind != "train" or job.state in ("starting", "running"):
            return False
        if self.trained(job, progress):
            return True
        if not job.resumed_from:
            return False
        from musubi_tuner.training.state import complete_states

        folder, name = job.outputs.get("output_dir"), job.outputs.get("output_name")
        return bool(folder and name and complete_states(Path(folder), name))

    def _training(self, job: Job) -> dict:
        from musubi_tuner.training.loss_curve import LossHistory
        from musubi_tuner.training.sampling import grid_names

        folder, name = Path(job.outputs["output_dir"]), job.outputs["output_name"]
        history = LossHistory(folder / f"{name}-loss.csv", say=False)
        own = grid_names(name)
        grids = sorted((p for p in (folder / "sample").glob("*_grid.png") if own.fullmatch(p.name)), key=lambda p: p.stat().st_mtime)
        return {"curve": {"train": history.train, "validation": history.validation},
                "samples": [str(p) for p in grids], "files": [self._with_doctor(p) for p in self.lora_files(folder, name)]}

    @staticmethod
    def lora_files(folder: Path, name: str) -> list[Path]:
        from musubi_tuner.files import lora_file_names

        own = lora_file_names(name)
        found = [p for p in folder.glob("*.safetensors") if own.fullmatch(p.name) and p.is_file()]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def _with_doctor(self, path: Path) -> dict:
        """The file and the LoRA doctor's report on it (checked once per version of the file, in a worker thread)."""
        version = path.stat().st_mtime_ns
        checked = self._doctor.get(str(path))
        if checked is None or checked[0] != version:
            if checked is not None:  # (an earlier version's report is not kept for the life of the studio)
                self.doctor_tasks.forget(checked[1])
            checked = self._doctor[str(path)] = (version, self.doctor_tasks.submit(_doctor, path))
        state = self.doctor_tasks.state(checked[1])
        return {"path": str(path), "name": path.name, "bytes": path.stat().st_size,
                "doctor": state.get("result") or state.get("error") or "checking..."}

    def _saved(self, job: Job) -> list[str]:
        """What this job wrote and is still there, as its log says (`saved PATH`: others' share its --save_path): videos,
        frame folders (--output_type images) and latent files (an images or latent run showed "no video written")."""
        log = self.jobs.path(job) / "log.txt"
        try:
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        saved = [Path(job.cwd or ".", line.removeprefix("saved ").strip()) for line in lines if line.startswith("saved ")]
        return [str(p) for p in saved if p.exists()]


def _doctor(path: Path) -> dict:
    from musubi_tuner.networks.lora_doctor import diagnose, diagnosis_text

    diagnosis = diagnose(path)
    return {"ok": diagnosis.ok, "text": diagnosis_text(diagnosis), "checked": time.time()}

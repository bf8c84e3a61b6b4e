"""Experiment trackers, off unless asked: MLflow (`--mlflow [URI]`) and Weights & Biases (`--log-wandb`).

Only rank 0 talks to them. What they get: the resolved settings once (as parameters / config), then every
epoch's metrics.csv row, read back from metrics.csv after it is written (so exactly its numeric columns), at
step = epoch; at the end, with --log-checkpoint, model_best as an artefact.

Each epoch reaches a tracker once. A tracker knows which epochs it holds (MLflow: the run's metric history;
W&B: OUTPUT_DIR/wandb-epochs.json, written after each log, as W&B's offline files cannot be queried). After a
resume the same tracker run continues (its id is in the checkpoint): the epochs the checkpoint has done that
the run lacks are sent first, from metrics.csv; an epoch the run already holds is never sent again.

A tracker that cannot start is a UserError before training; one that fails later is dropped with one
warning, and training goes on (a later resume sends what it missed).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time

from ..config import BEST_NAME, EXIT_PREEMPTED, METRICS_NAME, MLFLOW_IN_OUTPUT, Config, UserError, import_extra
from ..files import write_text
from ..report import read_metrics
from ..runtime import on_main

WANDB_LEDGER = "wandb-epochs.json"  # the epochs sent to W&B, by run id
MLFLOW_DB = "mlflow.db"  # --mlflow without a URI: OUTPUT_DIR/mlflow.db
MLFLOW_ARTIFACTS = "mlflow-artifacts"  # ... and its artefacts
_EXIT = {"preempted": EXIT_PREEMPTED, "failed": 1}  # W&B exit codes of a run that did not finish


def _first_line(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:300]}"


def run_name(cfg: Config) -> str:
    """The tracker run's name: the output folder's."""
    return os.path.basename(os.path.abspath(cfg.output_dir)) or "xception"


def project_name(cfg: Config) -> str:
    """The MLflow experiment and W&B project: --tracker-project, else the output folder's name."""
    return cfg.tracker_project or run_name(cfg)


def mlflow_uri(cfg: Config) -> str:
    if cfg.mlflow == MLFLOW_IN_OUTPUT:
        return "sqlite:///" + os.path.abspath(os.path.join(cfg.output_dir, MLFLOW_DB))
    return cfg.mlflow


class _Mlflow:
    flag = "--mlflow"

    def __init__(self, cfg: Config):
        entities = import_extra("mlflow.entities", self.flag, "mlflow")
        self.Metric, self.Param = entities.Metric, entities.Param
        self.uri = mlflow_uri(cfg)
        self.client = import_extra("mlflow.tracking", self.flag, "mlflow").MlflowClient(tracking_uri=self.uri)
        self.id, self.logged = None, set()

    def start(self, cfg: Config, saved_id, done: int, log) -> None:
        client = self.client
        run = None
        if saved_id:
            try:
                run = client.get_run(saved_id)
                run = None if run.info.lifecycle_stage == "deleted" else run
            except Exception:  # noqa: BLE001  (another store)
                pass
            if run is None:
                log(f"--mlflow: the checkpoint's run {saved_id} is not in {self.uri}; starting a new run")
        if run is None:
            found = client.get_experiment_by_name(project_name(cfg))
            where = None
            if cfg.mlflow == MLFLOW_IN_OUTPUT:  # the artefacts beside the database, not in the working folder
                where = pathlib.Path(os.path.abspath(os.path.join(cfg.output_dir, MLFLOW_ARTIFACTS))).as_uri()
            exp = found.experiment_id if found else client.create_experiment(project_name(cfg), where)
            run = client.create_run(exp, run_name=run_name(cfg))
        else:
            client.update_run(saved_id, status="RUNNING")
        self.id = run.info.run_id
        self.logged = {int(m.step) for m in client.get_metric_history(self.id, "train_loss")}
        self._params(cfg, run.data.params)
        log(f"--mlflow: run {self.id} ({'continued' if run.info.run_id == saved_id else 'new'}) at {self.uri}")

    def _params(self, cfg: Config, have: dict) -> None:
        """The settings, flattened to strings; a resumed run adds the new keys only (MLflow keeps a
        parameter's first value)."""
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        new = [self.Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in sorted(cfg.to_dict().items()) if k not in have]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.id, params=new[i:i + 100])

    def log(self, epoch: int, values: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[self.Metric(k, v, now, epoch) for k, v in values.items()])

    def upload(self, path: str) -> None:
        self.client.log_artifact(self.id, path)

    def finish(self, how: str) -> None:
        self.client.set_terminated(self.id, {"finished": "FINISHED", "preempted": "KILLED"}.get(how, "FAILED"))


class _Wandb:
    flag = "--log-wandb"

    def __init__(self, cfg: Config):
        self.wandb, self.run, self.logged = import_extra("wandb", self.flag, "wandb"), None, set()
        self.ledger = os.path.join(cfg.output_dir, WANDB_LEDGER)

    def start(self, cfg: Config, saved_id, done: int, log) -> None:
        where = {} if os.environ.get("WANDB_DIR") else {"dir": cfg.output_dir}  # W&B's variable wins
        self.run = self.wandb.init(project=project_name(cfg), name=run_name(cfg), id=saved_id or None,
                                   resume="allow", **where)
        self.run.config.update(cfg.to_dict(), allow_val_change=True)
        kept = self._ledger()
        if kept is not None:
            self.logged = kept
        elif saved_id:  # no ledger: trust the checkpoint
            self.logged = set(range(1, done + 1))
        last = self.run.summary.get("epoch")  # an online resume: what the server has
        if isinstance(last, (int, float)):
            self.logged |= set(range(1, int(last) + 1))
        log(f"--log-wandb: run {self.run.id} ({'continued' if saved_id else 'new'}, "
            f"{'offline' if self.run.offline else 'online'})")

    def _ledger(self):
        try:
            with open(self.ledger) as f:
                kept = json.load(f)
        except (OSError, ValueError):
            return None
        return set(kept.get("epochs", [])) if kept.get("id") == self.run.id else None

    @property
    def id(self):
        return self.run.id if self.run is not None else None

    def log(self, epoch: int, values: dict) -> None:
        self.run.log({"epoch": epoch, **values}, step=epoch)
        write_text(self.ledger, json.dumps({"id": self.run.id, "epochs": sorted(self.logged | {epoch})}))

    def upload(self, path: str) -> None:
        art = self.wandb.Artifact(re.sub(r"[^\w.-]", "_", self.run.name or "run") + "-best", type="model")
        art.add_file(path)
        self.run.log_artifact(art)

    def finish(self, how: str) -> None:
        if how == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=_EXIT.get(how, 0))


class Trackers:
    """The trackers of one run: started on rank 0 only (elsewhere it holds none and does nothing). `ids`:
    the tracker run ids for the checkpoint: the saved ones, updated by the trackers on now."""

    def __init__(self, cfg: Config, saved: dict | None, log):
        self.cfg, self.log = cfg, log
        self.ids = dict(saved or {})
        self.on = []

    def start(self, done: int) -> None:
        """Start (or continue) each tracker asked for, then send the epochs up to `done` it lacks."""
        wanted = [(name, kind) for name, kind, asked in (("mlflow", _Mlflow, self.cfg.mlflow is not None),
                                                         ("wandb", _Wandb, self.cfg.log_wandb)) if asked]
        for name, kind in wanted:
            tracker = self._begin(name, kind, done)
            self.on.append(tracker)
            self.ids[name] = tracker.id
        self.catch_up(done)

    def _begin(self, name: str, kind, done: int):
        saved = self.ids.get(name)
        try:
            tracker = kind(self.cfg)
            if not saved and self.cfg.resume:
                self.log(f"{kind.flag}: the checkpoint names no {name} run; starting a new one")
            tracker.start(self.cfg, saved, done, self.log)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (each library has its own errors: a bad URI, no server)
            where = f" {mlflow_uri(self.cfg)}" if name == "mlflow" else ""
            raise UserError(f"{kind.flag}{where}: cannot start a run ({_first_line(e)})") from None
        return tracker

    def _safely(self, tracker, what: str, call, *args) -> None:
        """A tracker failing mid-run warns once and is dropped; training goes on."""
        try:
            call(*args)
        except Exception as e:  # noqa: BLE001
            print(f"xception: warning: {tracker.flag}: {what} failed ({_first_line(e)}); training goes on "
                  f"without it (a resume sends it the epochs it missed)", file=sys.stderr, flush=True)
            self.on.remove(tracker)

    def catch_up(self, upto: int) -> None:
        """Send every tracker the metrics.csv rows of epochs 1..upto it does not hold yet, in order."""
        if not self.on or upto < 1:
            return
        try:
            table = read_metrics(os.path.join(self.cfg.output_dir, METRICS_NAME))
        except UserError:  # no rows yet
            return
        for i, epoch in enumerate(int(e) for e in table["epoch"]):
            if epoch > upto:
                break
            values = {k: v[i] for k, v in table.items() if k != "epoch" and v[i] is not None}
            for tracker in list(self.on):
                if epoch not in tracker.logged:
                    self._safely(tracker, f"logging epoch {epoch}", tracker.log, epoch, values)
                    tracker.logged.add(epoch)

    def upload_best(self) -> None:
        """--log-checkpoint: model_best as an artefact of every tracker."""
        path = os.path.join(self.cfg.output_dir, BEST_NAME)
        if not self.cfg.log_checkpoint or not os.path.isfile(path):
            return
        for tracker in list(self.on):
            self._safely(tracker, f"uploading {BEST_NAME}", tracker.upload, path)

    def close(self, error: BaseException | None) -> None:
        """End the tracker runs: finished, preempted (a resume continues them) or failed."""
        how = "finished" if error is None else "preempted" if getattr(error, "exit_code", 0) == EXIT_PREEMPTED else "failed"
        for tracker in list(self.on):
            self._safely(tracker, "closing its run", tracker.finish, how)
        self.on = []


def open_trackers(cfg: Config, ctx, saved: dict | None, done: int, log) -> Trackers:
    """The run's trackers, started on rank 0 (a failure to start is every rank's UserError); `saved`: the
    checkpoint's tracker ids, `done`: the epochs it has trained."""
    trackers = Trackers(cfg, saved, log)
    if cfg.mlflow is not None or cfg.log_wandb:
        on_main(ctx, trackers.start, done)
    return trackers

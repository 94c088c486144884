"""What `train` and `federate` share around their loops: threads, the checked dataset and model, the
compiled kernels, the run directory (config.toml, metrics, checkpoints), and the final summary/model."""
import os
import time

from . import __version__
from .checkpoint import Checkpointer, atomic_write, save_model
from .config import DEFAULT_PARTITION, default_data_path, default_federated_data_path, to_toml
from .data.shard import DataFile
from .data.text import default_text_path, read_token_part
from .errors import MpitrainError
from .evaluate import read_part, target_attrs
from .kernels import compiled
from .model import Model, ModelSpec
from .report import RunLog, clear_run, held_run, make_run_dir, read_summary
from .startup import check_world
from .threads import limit, threads_per_rank


def ensure_default_data(comm, path):
    """Prepare the embedded default dataset on first use: rank 0 writes it, the others wait.  Whether to
    wait depends on the path only, never on what a rank sees on disk: a rank that looked after rank 0 had
    written the file would otherwise skip the wait and leave rank 0 alone in it."""
    if path in (default_data_path(), default_federated_data_path(), default_text_path()):
        comm.agree(_prepare_default, comm.rank, path)


def _prepare_default(rank, path):
    if rank == 0 and not os.path.exists(path):
        from .data.prepare import prepare

        if path in (default_data_path(), default_text_path()):
            print(prepare("digits" if path == default_data_path() else "pydoc", path), flush=True)
            return
        from .data.partition import write_partition

        p, lines = DEFAULT_PARTITION, []

        def write(tmp):  # prepared and partitioned under a temporary name: the cache holds a whole file or none
            for line in (prepare("digits", tmp),
                         write_partition(tmp, p["scheme"], p["clients"], p["alpha"], seed=p["seed"])):
                lines.append(path + line[len(tmp):])

        atomic_write(path, write)
        print("\n".join(lines), flush=True)


def check_start(out, resume, overwrite, ckpt_dir):
    """The run-folder arguments that cannot go together, refused before any work."""
    if resume is not None and overwrite:
        raise MpitrainError(f"--resume {resume} with --overwrite: a run either continues or starts afresh; "
                            "give one of them")
    if resume == "auto" and out is None and not ckpt_dir:
        raise MpitrainError("--resume auto without --out: auto continues the run in the folder --out names "
                            "(a new runs/<timestamp> folder holds no checkpoint); give --out")


def _refuse_reuse(rank, out, ckpt_dir, auto):
    """Rank 0: refuse a run folder that holds another run, unless --resume auto found no checkpoint there:
    then the run starts afresh where one stopped before its first checkpoint, but not over a finished one."""
    held = held_run(out, ckpt_dir) if rank == 0 else []
    if auto and "summary.json" in held:
        raise MpitrainError(f"{out}: holds a finished run (summary.json) but no checkpoint in {ckpt_dir} to "
                            "continue it from; replace it with --overwrite, or choose another --out")
    if held and not auto:
        raise MpitrainError(f"{out}: holds a run ({', '.join(held)}); continue it with --resume auto, replace "
                            "it with --overwrite, or choose another --out")


# What model.kind = gpt trains with where the configuration does not say: nanoGPT's CPU "baby GPT" recipe
# (AdamW, lr 1e-3, β2 0.99, weight decay 0.1, warm-up 100, batch 12, 2000 steps: minutes on 2 cores) and
# the embedded text; train's defaults are an MLP's (SGD with momentum for 40 epochs).
GPT_DEFAULTS = {"train.optimizer": "adamw", "train.lr": 1e-3, "train.beta2": 0.99, "train.weight_decay": 0.1,
                "train.warmup_steps": 100, "train.clip_norm": 1.0, "train.global_batch": 12, "train.steps": 2000,
                "train.eval_every": 250}


def gpt_defaults(cfg):
    """Set GPT_DEFAULTS and the embedded text where cfg.given does not name them; the settings chosen, as
    lines."""
    given, chose = getattr(cfg, "given", set()), []
    if "data.path" not in given:
        cfg.data.path = default_text_path()
        chose.append(f"data.path = {cfg.data.path} (Python's documentation topics, characters as tokens)")
    changed = [k for k in GPT_DEFAULTS if k not in given and not (k == "train.steps" and "train.epochs" in given)]
    for key in changed:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, GPT_DEFAULTS[key])
    if changed:
        chose.append(", ".join(f"{k} = {GPT_DEFAULTS[k]:g}" if not isinstance(GPT_DEFAULTS[k], str)
                               else f"{k} = {GPT_DEFAULTS[k]}" for k in changed))
    return chose


class Session:
    def __init__(self, cfg, comm):
        self.started = time.perf_counter()
        self.cfg, self.comm = cfg, comm
        self.threads = limit(threads_per_rank())
        m = cfg.model
        ensure_default_data(comm, cfg.data.path)
        self.data = data = comm.agree(DataFile, cfg.data.path)
        self.config_text = to_toml(cfg)
        check_world(comm, self.config_text, self.data.checksum)
        lm = data.task == "lm"  # a language model's samples are windows of block_size tokens
        self.spec = comm.agree(ModelSpec, m.kind, m.block_size if lm else data.n_features, data.n_out,
                               tuple(m.hidden), m.activation, tuple(m.layers),
                               (m.block_size,) if lm else data.feature_shape, data.task, m.n_layer, m.n_head,
                               m.n_embd, m.dropout, m.norm)
        self.kernels = comm.agree(compiled, comm, cfg.train.device)
        self.model = Model(self.spec, cfg.train.device)
        self.init = None  # train.init: matched before any file is written; the data is then read as its rows were
        if cfg.train.init:
            from .finetune import Init

            self.init = comm.agree(Init, cfg.train.init, self.model, data, cfg.train.init_skip)
            data.adopt(self.init.standardize)
        self.test_x, self.test_y = self.part("test")

    def part(self, split):
        """This rank's block of a split: rows, or a language model's windows."""
        if self.data.task == "lm":
            return read_token_part(self.comm, self.data, self.cfg.model.block_size, split)
        return read_part(self.comm, self.data, split)

    def open(self, out, total, quiet, resume, meaning, unit, past, overwrite=False):
        """Claim the run directory and decide where the run starts: returns (index, arrays, attrs) of the
        checkpoint to continue from, or None to start at 0.  A run resumed at its end whose summary.json is in
        place is complete: self.finished is then that summary and nothing is written.  Every check comes
        before the first write, so a refused start leaves the folder as it was.  meaning: see Checkpointer;
        unit: "step" or "round"; past(index): what to change for a checkpoint past `total`."""
        comm = self.comm
        self.out, lock = make_run_dir(comm, out)
        self.log, self.finished = RunLog(comm, self.out, lock, quiet, self.cfg.train.log), None
        try:
            self.ckpt = Checkpointer(comm, self.cfg, self.out, self.spec, self.config_text, self.data.checksum,
                                     meaning)
            resumed = self.ckpt.resume(resume, self.log.say)
            index = 0 if resumed is None else resumed[1]
            own = resumed is not None and (os.path.realpath(os.path.dirname(resumed[0]))
                                           == os.path.realpath(self.ckpt.dir))  # continues this folder's run
            if not (overwrite or own):
                comm.agree(_refuse_reuse, comm.rank, self.out, self.ckpt.dir, resume == "auto")
            if index > total:
                raise MpitrainError(f"{resumed[0]}: the checkpoint of {unit} {index} lies past this run's last "
                                    f"({total}); a resume continues a run and cannot take back {unit}s done: "
                                    f"{past(index)}, or leave out --resume to start afresh", agreed=True)
            if resumed is not None and index == total:
                done = read_summary(comm, self.out)
                if done is not None and done.get(unit + "s") == index:
                    self.log.say(f"{self.out}: the run finished at {unit} {index} already; nothing to do, its "
                                 "files are left as they were")
                    self.log.release()
                    self.finished = done
                    return None
        except BaseException:
            self.log.release()
            raise
        if resume == "auto" and resumed is None:  # said even when a mistyped --out makes the folder new
            self.log.say(f"no checkpoint in {self.ckpt.dir}: starting fresh")
        elif resumed is not None:
            self.log.say(f"resuming from {resumed[0]}")
        if comm.rank == 0:
            if overwrite:
                clear_run(self.out, self.ckpt.dir)
            with open(os.path.join(self.out, "config.toml"), "w", encoding="utf-8") as f:
                f.write(self.config_text)
        self.log.start(index, total)
        return None if resumed is None else resumed[1:]

    def save(self, name, params, **model_attrs):
        """Rank 0 writes the model file `name` (model.h5, best.h5) in the run folder, atomically: the
        parameters (whole on rank 0), the model's state vector, the data's standardisation, vocabulary, class
        names or target standardisation."""
        if self.comm.rank == 0:
            save_model(os.path.join(self.out, name), self.spec, params, self.data.standardize,
                       self.model.ctx.state, data_checksum=self.data.checksum,
                       **{k: self.data.f.attrs[k] for k in ("tokenizer", "vocab", "class_names")
                          if k in self.data.f.attrs},
                       **target_attrs(self.data.targets if self.data.task == "regress" else None),
                       **model_attrs)

    def diverged(self, where, what):
        """The one line of a run whose loss or update stopped being finite (train and federate alike)."""
        return MpitrainError(f"{where}: {what} is not finite; stopping before it reaches a checkpoint (the "
                             f"last good one stays in {self.ckpt.dir})", agreed=True)

    def stop(self, index):
        """After the checkpoint of a requested stop: close the log and raise Preempted (exit 75) on every rank."""
        from . import preempt

        self.log.say(f"stop requested: checkpointed {index} in {self.ckpt.dir}; exit {preempt.EXIT_PREEMPTED}")
        self.log.finish(None)
        raise preempt.Preempted()

    def finish(self, summary, params, **model_attrs):
        """Add the common summary fields, write model.h5 (rank 0: the parameters, the model's state vector,
        the data's standardisation, vocabulary, class names or target standardisation) and summary.json; all
        ranks return together."""
        summary.update(world_size=self.comm.size, threads_per_rank=self.threads, n_params=self.spec.n_params,
                       wall_seconds=time.perf_counter() - self.started, data=self.cfg.data.path,
                       data_checksum=self.data.checksum, mpitrain_version=__version__)
        self.save("model.h5", params, **model_attrs)
        self.log.finish(summary)
        self.comm.barrier()
        return summary

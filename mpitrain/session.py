"""What `train` and `federate` share around their loops: threads, the checked dataset and model, the
compiled kernels, the run directory (config.toml, metrics, checkpoints), and the final summary/model."""
import os
import time

from . import __version__
from .checkpoint import Checkpointer, atomic_write, save_model
from .config import DEFAULT_PARTITION, default_data_path, default_federated_data_path, to_toml
from .data.shard import DataFile
from .errors import MpitrainError
from .evaluate import read_part
from .kernels import compiled
from .model import Model, ModelSpec
from .report import RunLog, make_run_dir
from .startup import check_world
from .threads import limit, threads_per_rank


def ensure_default_data(comm, path):
    """Prepare the embedded default dataset on first use: rank 0 writes it, the others wait.  Whether to
    wait depends on the path only, never on what a rank sees on disk: a rank that looked after rank 0 had
    written the file would otherwise skip the wait and leave rank 0 alone in it."""
    if path in (default_data_path(), default_federated_data_path()):
        comm.agree(_prepare_default, comm.rank, path)


def _prepare_default(rank, path):
    if rank == 0 and not os.path.exists(path):
        from .data.prepare import prepare

        if path == default_data_path():
            print(prepare("digits", path), flush=True)
            return
        from .data.partition import write_partition

        p, lines = DEFAULT_PARTITION, []

        def write(tmp):  # prepared and partitioned under a temporary name: the cache holds a whole file or none
            for line in (prepare("digits", tmp),
                         write_partition(tmp, p["scheme"], p["clients"], p["alpha"], seed=p["seed"])):
                lines.append(path + line[len(tmp):])

        atomic_write(path, write)
        print("\n".join(lines), flush=True)


class Session:
    def __init__(self, cfg, comm):
        self.started = time.perf_counter()
        self.cfg, self.comm = cfg, comm
        self.threads = limit(threads_per_rank())
        ensure_default_data(comm, cfg.data.path)
        self.data = comm.agree(DataFile, cfg.data.path)
        self.config_text = to_toml(cfg)
        check_world(comm, self.config_text, self.data.checksum)
        self.spec = comm.agree(ModelSpec, cfg.model.kind, self.data.n_features, self.data.n_classes,
                               tuple(cfg.model.hidden), cfg.model.activation, tuple(cfg.model.layers),
                               self.data.feature_shape)
        self.test_x, self.test_y = read_part(comm, self.data)
        self.kernels = comm.agree(compiled, comm, cfg.train.device)
        self.model = Model(self.spec, cfg.train.device)

    def open(self, out, total, quiet, resume, meaning):
        """Create the run directory and its log; returns (index, arrays, attrs) of the checkpoint to
        resume from, or None.  meaning: see Checkpointer."""
        self.out, lock = make_run_dir(self.comm, out)
        if self.comm.rank == 0:
            with open(os.path.join(self.out, "config.toml"), "w", encoding="utf-8") as f:
                f.write(self.config_text)
        self.log = RunLog(self.comm, self.out, lock, total, quiet)
        self.ckpt = Checkpointer(self.comm, self.cfg, self.out, self.spec, self.config_text, self.data.checksum,
                                 meaning)
        resumed = self.ckpt.resume(resume, self.log.say)
        if resumed is None:
            self.log.advance(0)
            return None
        path, index, arrays, attrs = resumed
        if index > total:
            advice = ("it is another run's (use another --out or checkpoint.dir)" if resume == "auto" else
                      "raise train.steps / fed.rounds to continue it")
            raise MpitrainError(f"{path}: the checkpoint of step/round {index} lies past this run's last "
                                f"({total}): {advice}", agreed=True)
        self.log.advance(index)
        return index, arrays, attrs

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
        """Add the common summary fields, write model.h5 (rank 0) and summary.json; all ranks return together."""
        summary.update(world_size=self.comm.size, threads_per_rank=self.threads, n_params=self.spec.n_params,
                       wall_seconds=time.perf_counter() - self.started, data=self.cfg.data.path,
                       data_checksum=self.data.checksum, mpitrain_version=__version__)
        if self.comm.rank == 0:
            save_model(os.path.join(self.out, "model.h5"), self.spec, params, self.data.standardize,
                       data_checksum=self.data.checksum, **model_attrs)
        self.log.finish(summary)
        self.comm.barrier()
        return summary

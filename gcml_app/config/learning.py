"""What a site learns and how: intensity, network, training, validation (the gate), DCML, fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from gcml_app.config.base import _Strict

__all__ = [
    "BundleNetConfig",
    "DCMLConfig",
    "DistributedConfig",
    "FinetuneConfig",
    "IntensityConfig",
    "InteractiveConfig",
    "NetworkConfig",
    "SegResNetConfig",
    "TrainConfig",
    "UNetConfig",
    "ValidationConfig",
]


class IntensityConfig(_Strict):
    """How image intensities are normalised before the network.

    ``zscore``: per-channel (x - mean) / std over the volume.
    ``range``: clip to [a_min, a_max] and scale linearly to [b_min, b_max] (CT-style windows).
    """

    mode: Literal["zscore", "range"] = "zscore"
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0

    @model_validator(mode="after")
    def _window(self) -> IntensityConfig:
        if self.mode == "range" and not self.a_min < self.a_max:
            raise ValueError(f"found a_min={self.a_min}, a_max={self.a_max}; expected a_min < a_max")
        return self


MonaiOption = Union[str, tuple[str, dict[str, Any]]]
"""A MONAI layer option as its constructors take it: ``batch``, or ``[group, {num_groups: 4}]``."""

_START_KEYS = ("init_from", "strict")  # where the weights start; not part of the architecture


class _Network(_Strict):
    """What every network shares: where its weights start, and the layer DCML's features come from.

    ``init_from`` is a MONAI bundle folder (``configs/`` and ``models/model.pt`` or ``model.safetensors``)
    or a checkpoint file (``.pt``/``.pth``, read with ``torch.load(weights_only=True)``, or
    ``.safetensors``): the site's first model takes its weights (the backbone; the DCML projection
    head starts fresh). Every missing, unexpected or mis-shaped weight is named; a partial load
    (e.g. a bundle with other output classes) needs ``strict: false``.

    ``feature_layer`` is the dotted name of the backbone module whose *output* DCML's contrastive term
    reads (a forward hook); default: the last decoder features of MONAI's UNet (``model.1``, the top skip
    connection's concatenation) and SegResNet (the last ``up_layers`` block).
    """

    init_from: Path | None = Field(None, description="bundle folder or checkpoint the first model starts from")
    strict: bool = Field(True, description="init_from must fill every backbone weight, each with our shape")
    feature_layer: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$",
                                      description="backbone module whose output DCML's features are")

    def arch_desc(self) -> dict[str, Any]:
        """What fixes the architecture, for the fingerprint: every key but where the weights start; the
        MONAI options left unset (``None``: MONAI's default) are left out, so models stored before those
        options existed keep their fingerprint."""
        d = self.model_dump(mode="json", exclude=set(_START_KEYS))
        return {k: v for k, v in d.items() if v is not None}


class UNetConfig(_Network):
    """MONAI ``UNet``: ``channels[i]`` features at level i, downsampled by ``strides[i]``.

    ``norm``, ``act``, ``kernel_size``, ``up_kernel_size``, ``bias`` and ``adn_ordering`` are passed to
    MONAI when set (unset: MONAI's defaults, instance norm and PReLU); the spleen bundle's UNet is
    ``norm: batch``.
    """

    name: Literal["UNet"] = "UNet"
    channels: tuple[Annotated[int, Field(ge=1)], ...] = (16, 32, 64, 128)
    strides: tuple[Annotated[int, Field(ge=1)], ...] = (2, 2, 2)
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: MonaiOption | None = None
    act: MonaiOption | None = None
    kernel_size: int | None = Field(None, ge=1)
    up_kernel_size: int | None = Field(None, ge=1)
    bias: bool | None = None
    adn_ordering: str | None = Field(None, pattern=r"^[NDA]{1,3}$")

    def monai_kwargs(self) -> dict[str, Any]:
        """The constructor options set in the YAML (MONAI's names)."""
        keys = ("norm", "act", "kernel_size", "up_kernel_size", "bias", "adn_ordering")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @model_validator(mode="after")
    def _levels(self) -> UNetConfig:
        if len(self.channels) < 2 or len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"found channels={list(self.channels)} with strides={list(self.strides)}; "
                "expected at least 2 channels and len(strides) == len(channels) - 1"
            )
        return self

    @property
    def downsample(self) -> int:
        """Total downsampling factor; ROI sizes must be divisible by it."""
        f = 1
        for s in self.strides:
            f *= s
        return f


class SegResNetConfig(_Network):
    """MONAI ``SegResNet``: ``init_filters`` doubled at each of ``len(blocks_down)`` levels.

    ``norm``, ``act`` and ``upsample_mode`` are passed to MONAI when set (unset: group norm with 8
    groups, ReLU, non-trainable upsampling).
    """

    name: Literal["SegResNet"]
    init_filters: int = Field(8, ge=1)
    blocks_down: tuple[Annotated[int, Field(ge=1)], ...] = (1, 2, 2, 4)
    blocks_up: tuple[Annotated[int, Field(ge=1)], ...] = (1, 1, 1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: MonaiOption | None = None
    act: MonaiOption | None = None
    upsample_mode: Literal["deconv", "nontrainable", "pixelshuffle"] | None = None

    def monai_kwargs(self) -> dict[str, Any]:
        keys = ("norm", "act", "upsample_mode")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @model_validator(mode="after")
    def _levels(self) -> SegResNetConfig:
        if self.init_filters % 8 and self.norm is None:
            raise ValueError(
                f"found init_filters={self.init_filters}; expected a multiple of 8 (SegResNet's group norm uses 8 groups)"
            )
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(
                f"found blocks_down={list(self.blocks_down)} with blocks_up={list(self.blocks_up)}; "
                "expected len(blocks_up) == len(blocks_down) - 1"
            )
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.blocks_down) - 1)


class BundleNetConfig(_Network):
    """The network a MONAI bundle defines: ``init_from``'s ``configs/inference.json`` (or ``train.json``)
    entry ``net_key``, built with ``monai.bundle.ConfigParser``; its weights from ``models/``.

    The bundle's input and output channels are set to the site's (``input_channels``, one per label plus
    background); a bundle trained for other classes then loads with ``strict: false``, its output layer
    starting fresh. Only a network class of ``monai.networks.nets`` is built, and no ``$`` expression of
    the bundle's config is evaluated (:mod:`gcml_app.ml.bundle`).
    """

    name: Literal["bundle"]
    init_from: Path
    net_key: str = Field("network_def", pattern=r"^[A-Za-z0-9_#]+$")

    @property
    def downsample(self) -> int:
        return 1  # checked when the network is built: a dry run at roi_size


NetworkConfig = Annotated[Union[UNetConfig, SegResNetConfig, BundleNetConfig], Field(discriminator="name")]


class DistributedConfig(_Strict):
    """One round over several machines of one site (docs/design.md, "Several machines").

    Node 0 is the MONAI Label server: its round hosts the rendezvous (a ``torch.distributed`` TCPStore on
    ``rendezvous``) and rank 0; every other node runs ``gcml node`` with the same YAML but its own
    ``node_rank``. Each node runs one rank per entry of its ``train.gpus``, the same number on every node.
    The nodes share ``state_dir`` (one path on a shared file system, where the site's cases and the case
    cache already are) and a secret in the environment variable ``token_env``: node 0 signs each round's
    work with it and a node runs only work it can verify.
    """

    nodes: int = Field(ge=2, description="machines in the round, this one included")
    node_rank: int = Field(ge=0, description="this machine's place: 0 = the MONAI Label server")
    rendezvous: str = Field(description="host:port of node 0's rendezvous on the site's training network")
    token_env: str = Field(description="environment variable holding the nodes' shared secret (at least 32 "
                           "characters, e.g. secrets.token_urlsafe(32)), the same on every node")

    @model_validator(mode="after")
    def _where(self) -> DistributedConfig:
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank: found {self.node_rank}; expected 0 to {self.nodes - 1} for "
                             f"{self.nodes} nodes")
        self.address()
        return self

    def address(self) -> tuple[str, int]:
        """``rendezvous`` as (host, port)."""
        host, _, port = self.rendezvous.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rendezvous: found {self.rendezvous!r}; expected host:port with a port of 1-65535")
        return host.strip("[]"), int(port)

    def secret(self) -> bytes:
        """The nodes' shared secret; raises ``KeyError`` naming the variable when it is unset or too short."""
        value = os.environ.get(self.token_env, "")
        if len(value) < 32:
            raise KeyError(f"environment variable {self.token_env} (train.distributed's shared secret) is "
                           f"{'not set' if not value else 'shorter than 32 characters'}")
        return value.encode()


class TrainConfig(_Strict):
    """How the site trains: its working model's supervised passes, and the settings every round shares
    (batches, crops, optimizer, seed, device, threads, priority, warm start)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(2, ge=1)
    samples_per_case: int = Field(2, ge=1, description="random ROI crops drawn from each case per epoch")
    augment: Literal["scanner", "flip", "none"] = Field(
        "scanner", description="training crop augmentation: scanner = nnU-Net's intensity and mild spatial recipe "
        "(what differs between scanners: noise, blur, brightness, contrast, bias field, resolution, gamma and "
        "inverted gamma; small rotations and scaling; a flip), flip = a left-right flip only, none "
        "(gcml_app.ml.transforms.augment_transforms)")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu: int = Field(0, ge=0, description="CUDA device index that trains and validates (device auto or cuda)")
    gpus: list[int] | Literal["all"] | None = Field(
        None, description="devices one round spreads over with torch.distributed: one process per device, "
        "DistributedDataParallel, the validation cases split (docs/design.md, 'Several devices'); a list of CUDA "
        "indices or all; none = one device (train.gpu). With train.device: cpu each entry is one CPU process "
        "(gloo): CPU-only servers, the tests and gcml bench --ddp")
    rank_timeout_s: float = Field(
        300.0, gt=0.0, description="several devices: how long a rank waits at the rendezvous or in a collective "
        "for the others before the round ends as failed (a rank that died or hangs)")
    gpu_memory_fraction: float | None = Field(
        None, gt=0.0, le=1.0, description="cap on the training process's share of that GPU's memory, when "
        "inference shares the GPU (torch.cuda.set_per_process_memory_fraction); none = no cap")
    amp: Literal["auto", "on", "off"] = Field(
        "auto", description="mixed precision: auto = on CUDA only (bf16 where the GPU supports it, else fp16 with "
        "a gradient scaler; losses, softmaxes and the KL in fp32)")
    deterministic: bool = Field(False, description="CUDA: deterministic cuDNN kernels instead of autotuned ones "
                                "(cudnn.benchmark, faster for the fixed-size crops); the CPU path is always deterministic")
    num_workers: int = Field(0, ge=0, description="data-loading worker processes; 0 = one background thread "
                             "(MONAI ThreadDataLoader), so crops are drawn while the model trains")
    cache_max_gb: float = Field(50.0, gt=0.0, description="bound on the preprocessed-case cache on disk; least "
                                "recently used entries are evicted beyond it (gcml_app.ml.cache)")
    cache_dir: Path | None = Field(None, description="where preprocessed cases are kept; default <state_dir>/cache")
    num_threads: int = Field(0, ge=0, description="torch CPU threads in the training process; 0 = torch default")
    nice: int = Field(10, ge=0, le=19, description="CPU niceness of the training process, so inference stays fast")
    sched_idle: bool = Field(True, description="run the training process (rounds, active-learning scoring) under "
                             "Linux's SCHED_IDLE policy: only on CPU time serving does not want, preempted at once by "
                             "a radiologist's request (niceness alone still slows gcml_seg about 20x on 2 busy cores); "
                             "false = niceness alone")
    distributed: DistributedConfig | None = Field(
        None, description="several machines: this node's place in one round over all of them (docs/design.md, "
        "'Several machines'); none = this machine alone")
    warm: bool = Field(True, description="keep a warm trainer process (imports done) that rounds fork from, instead "
                       "of a fresh interpreter per round (gcml_app.site.warm); costs its resident memory")

    @model_validator(mode="after")
    def _gpus(self) -> TrainConfig:
        if isinstance(self.gpus, list):
            if not self.gpus:
                raise ValueError("gpus: found []; expected a list of device indices, all, or none (one device)")
            if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"gpus: found {self.gpus}; expected distinct device indices >= 0")
        local = len(self.gpus) if isinstance(self.gpus, list) else 1
        world = local * (self.distributed.nodes if self.distributed else 1)
        if self.samples_per_case % world:
            where = f"{local} gpus" + (
                f" on each of {self.distributed.nodes} nodes" if self.distributed else "")
            raise ValueError(f"samples_per_case: found {self.samples_per_case} with {where}; expected "
                             f"a multiple of {world} (each case's crops are dealt out over the devices)")
        return self


class ValidationConfig(_Strict):
    """The site's held-out labels that gate every publish (docs/design.md, "The gate").

    A case is assigned to validation once, when it is first seen, and never moves.
    ``min_cases`` validation cases are filled first; after that a case joins validation
    when the split would otherwise fall below ``fraction``.

    The gate compares each candidate with the served model case by case (paired Dice deltas): a
    candidate publishes only if its mean paired gain exceeds ``margin`` (``decision: margin``), or
    if in addition a one-sided sign test over the cases gives ``p <= alpha``
    (``decision: sign_test``), and no label's mean Dice drops by more than ``max_label_drop``.
    A sign test over n cases can reach ``p = 2^-n`` at best, so fewer than
    ``ceil(log2(1 / alpha))`` validation cases cannot support a strict decision; ``/gcml/status``
    says so and how many more labels would.
    """

    fraction: float = Field(0.2, gt=0.0, lt=1.0)
    min_cases: int = Field(1, ge=1)
    sw_batch_size: int = Field(0, ge=0, description="windows per forward pass; 0 = sized to the device (1 on the "
                               "CPU, 4 on a GPU)")
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    decision: Literal["margin", "sign_test"] = "margin"
    margin: float = Field(0.005, ge=0.0, lt=1.0, description="mean paired Dice gain a candidate must exceed")
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="sign test level (decision: sign_test)")
    max_label_drop: float = Field(0.02, ge=0.0, le=1.0, description="largest mean Dice drop allowed on any label")
    gate: bool = Field(True, description="false serves every round's new working model unchecked (ablations only)")

    @property
    def strict_cases(self) -> int:
        """Validation cases a one-sided sign test needs to reach ``alpha``: ``ceil(log2(1/alpha))``."""
        import math

        return max(1, math.ceil(math.log2(1.0 / self.alpha) - 1e-9))


class DCMLConfig(_Strict):
    """Deep contrastive mutual learning (docs/design.md, "DCML"); every weight is configurable.

    ``loss_L = DiceCE(L) + w(t) lambda_kl T^2 KL_trust(I || L) + lambda_con InfoNCE(L <- I)``, symmetric for I.

    - ``lambda_kl * T^2`` is the weight of the distillation term relative to the supervised loss;
      the default 0.25 * 2^2 = 1 makes a voxel's KL weigh as much as its cross-entropy.
    - ``w(t)`` ramps from 0 to 1 over the first ``kl_rampup`` of a round's steps (a sigmoid ramp,
      ``exp(-5 (1 - t)^2)``), so a partner's model does not pull ours before both have adapted.
    - ``kl_mask: agree`` distils only at voxels where the teacher's prediction equals the label
      (``none``: every voxel); the mean is over all voxels, so a teacher that is wrong on our data
      pulls proportionally less.
    - Foreground voxels (labels > 0, dilated by ``dilation``) weigh ``min(n_bg / n_fg, fg_weight_max)``
      times a background voxel: balanced, but bounded.
    - ``batch_size``: labelled images per step, by default half of ``train.batch_size``: a round
      then takes twice the steps of a local round with two models, so each model makes as many
      optimizer steps as ``local2x``'s one model for the same compute (:func:`~gcml_app.ml.dcml.step_budget`).
    - ``lambda_unl`` (off by default): the same mutual KL on crops of the site's *unlabelled* images,
      where the teacher is at least ``confidence`` sure (:func:`~gcml_app.ml.losses.unlabelled_kl`),
      scaled by the teacher's Dice on the step's labelled crops, under the same ramp. A step then sees
      ``unlabelled_batch`` unlabelled images beside its labelled ones, and a round takes
      proportionally fewer steps, so it still costs what ``local2x`` costs.
    """

    lambda_kl: float = Field(0.25, ge=0.0)
    lambda_con: float = Field(0.1, ge=0.0)
    temperature: float = Field(2.0, gt=0.0, description="T of the mutual KL")
    kl_rampup: float = Field(0.3, ge=0.0, le=1.0, description="fraction of a round's steps over which the KL ramps up")
    kl_mask: Literal["agree", "none"] = Field("agree", description="distil where the teacher agrees with the label")
    fg_weight_max: float = Field(3.0, ge=1.0, description="bound on the foreground up-weighting of the KL")
    tau: float = Field(0.1, gt=0.0, description="InfoNCE temperature")
    samples_per_class: int = Field(
        128, ge=1, description="anchor voxels sampled per class per volume (128: the setting gcml simulate validates)")
    dilation: int = Field(2, ge=0, description="voxels the foreground region is dilated by for the KL balance")
    embed_dim: int = Field(32, ge=2, description="projection head output size")
    batch_size: int | None = Field(
        None, ge=1, description="labelled images per DCML step; default half of train.batch_size (at least 1), so "
        "that each of the two models takes as many optimizer steps as local2x's one model, at the same compute")
    lambda_unl: float = Field(
        0.0, ge=0.0, description="weight of the mutual KL on the site's unlabelled images; 0 (the default): labelled "
        "crops only, because at equal compute an unlabelled crop displaces a labelled one (docs/design.md, DCML); "
        "0.25 = lambda_kl makes a confident unlabelled voxel weigh as much as a trusted labelled one")
    confidence: float = Field(0.9, ge=0.0, lt=1.0, description="unlabelled voxels distil where the teacher's top "
                              "class probability is at least this (FixMatch's pseudo-label threshold)")
    unlabelled_batch: int = Field(1, ge=1, description="unlabelled images per step (each gives "
                                  "train.samples_per_case crops), beside train.batch_size labelled ones")
    unlabelled_max_cases: int = Field(32, ge=1, description="unlabelled images one round draws from the site's "
                                      "pool (a random subset): bounds a round's preprocessing and cache growth")
    train_incoming: bool = Field(True, description="false: the partner's model is a frozen teacher (forward "
                                 "passes only; one candidate, dcml_local)")
    choose: bool = Field(True, description="score the partner's model on the site's validation cases before a DCML "
                         "round and choose from that: mutual learning, a frozen teacher, or training alone, each at "
                         "local2x's compute (docs/design.md, 'Choosing how a partner's model is used'); false = "
                         "mutual learning every round")
    shown_worse: Literal["teacher", "alone"] = Field("teacher", description="with choose, a partner shown worse "
                                                     "on the site's validation cases by no more than "
                                                     "validation.max_label_drop: distilled from as a frozen "
                                                     "teacher, or 'alone': the site trains alone (local2x's "
                                                     "round), as it does beside a partner worse by more")
    interval: Literal["normal", "student"] = Field("normal", description="with choose, the quantile of the "
                                                   "one-sided interval on the partner's paired gain: the "
                                                   "normal's, or 'student': Student's t with n - 1 degrees of "
                                                   "freedom for n validation cases (wider with few cases)")
    mutual_bar: Literal["bound", "mean"] = Field("bound", description="with choose, when the partner's model "
                                                 "counts as worse: 'bound' (the default) when shown worse, the "
                                                 "upper end of the gate's interval on its paired gain below 0; "
                                                 "'mean': when its mean paired gain is below 0, so mutual "
                                                 "learning only beside a partner at least as good on our cases")
    pulled_candidate: bool = Field(False, description="with choose: the partner's model as pulled is also a "
                                   "candidate for the gate, scored by the choice (no training); served unchanged, "
                                   "as adopted from the partner, only if it beats the served model and every "
                                   "trained candidate on the site's validation cases")

    @model_validator(mode="after")
    def _choice_options_need_choose(self) -> DCMLConfig:
        if self.choose:
            return self
        for key, default, why in _NEED_CHOOSE:
            value = getattr(self, key)
            if value != default:
                shown = str(value).lower() if isinstance(value, bool) else value
                raise ValueError(f"{key}: {shown} only with choose: true ({why})")
        return self


# the choice's options, their defaults, and why another value means nothing without dcml.choose
_NEED_CHOOSE = [
    ("pulled_candidate", False, "the choice scores the partner's model on the site's validation cases; without it "
     "nothing does"),
    ("interval", "normal", "without the choice no interval is computed"),
    ("mutual_bar", "bound", "without the choice every DCML round is mutual learning"),
    ("shown_worse", "teacher", "without the choice every DCML round is mutual learning; nothing is shown worse"),
]


class InteractiveConfig(_Strict):
    """Click-to-correct (docs/design.md, "Clicks"): one network serves ``gcml_seg`` and ``gcml_edit``.

    With ``enabled`` the network takes the image plus one guidance channel per output channel
    (background first, then the labels in index order); zero guidance is the auto-segmentation. Every
    training crop carries simulated clicks with probability ``click_probability`` (seeds from the
    label, then ``train_clicks`` rounds of clicks on the model's own errors), zero guidance otherwise.
    Off, the network, its fingerprint and every round are exactly as without this section.
    """

    enabled: bool = Field(False, description="serve gcml_edit (type deepedit) beside gcml_seg; adds guidance "
                          "channels to the network (a partner without them still gossips: docs/design.md)")
    click_probability: float = Field(
        0.5, ge=0.0, le=1.0, description="share of training crops that carry simulated clicks (DeepEdit: 0.4); "
        "the rest train the auto-segmentation with zero guidance")
    train_clicks: int = Field(1, ge=0, le=10, description="rounds of simulated clicks on the model's own errors "
                              "after the seed clicks (each costs a forward pass without gradient)")
    sigma: float = Field(3.0, gt=0.0, description="Gaussian radius of a click's guidance signal, in voxels at "
                         "network spacing (DeepEdit's sigma)")
    gate_clicks: int = Field(3, ge=0, le=20, description="simulated clicks per validation case for the gate's "
                             "click Dice (0: zero-click Dice only)")
    max_clicks: int = Field(200, ge=1, le=10000, description="clicks one gcml_edit request may carry; more is "
                            "refused (422)")
    cache_images: int = Field(4, ge=0, description="zero-click predictions gcml_edit keeps in memory (per image "
                              "and served version; uint8, a 1 mm CT about 60 MB each), so a click costs only the "
                              "windows around the clicks; also the images gcml_seg and gcml_edit keep in network "
                              "space, at most 2 (float32, a 1 mm CT about 232 MB each; 0 keeps none)")
    cache_windows: int = Field(32, ge=0, description="predictions of click windows gcml_edit keeps (uint8, ROI-sized: "
                               "under 1 MB each at ROI 96), so a new click costs only the windows its signal reaches "
                               "(Slicer sends every click so far with each request)")


class FinetuneConfig(_Strict):
    """Rounds triggered by new labels from Slicer."""

    min_new_labels: int = Field(5, ge=0, description="new final labels that enqueue a round; 0 = never")
    epochs: int | None = Field(None, ge=1, description="epochs of that round; default train.epochs")




class ActiveConfig(_Strict):
    """Which unlabelled images "Next Sample" offers first (docs/design.md, "Which case to label next").

    In the background, at the training priority, the server scores the datastore's unlabelled images
    whenever the served model or a cached partner model changed: ``disagreement`` (the served model
    against the partners' models) and ``epistemic`` (MC dropout of the served model). A run scores at
    most ``max_images`` images, newest first; images whose score is current are skipped.
    """

    methods: list[Literal["disagreement", "epistemic"]] = Field(
        ["disagreement", "epistemic"], description="scores kept up to date in the background")
    poll_s: float = Field(30.0, ge=0.0, description="how often the server looks for stale scores; 0 = never")
    max_images: int = Field(20, ge=1, description="images scored per run (newest first); the next run goes on")
    mc_samples: int = Field(5, ge=2, description="stochastic passes of epistemic scoring (MONAI Label's default)")
    mc_dropout: float = Field(0.1, gt=0.0, lt=1.0, description="dropout rate of those passes where the "
                              "network's own is lower (a network trained without dropout)")
    selection: Literal["top", "proportional"] = Field(
        "proportional", description="disagreement hands out the highest score (top) or draws a case with probability "
        "proportional to its score (proportional: Kirsch et al. 2023's stochastic acquisition)")
    reserve_s: float = Field(3600.0, ge=0.0, description="a case Next Sample handed out is not offered again "
                             "by the same strategy for this long (two annotators, two cases)")
    top: int = Field(5, ge=1, le=50, description="top-scored cases /gcml/status lists (the Slicer module shows them)")

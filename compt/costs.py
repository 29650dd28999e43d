"""Cost accounting of a chain recipe: baseline cost, chain cost, acceleration ratio.

Follows METHOD.md, "Cost accounting": a stage costs samples x (student forward+backward
+ teacher forward); the baseline trains every model from scratch; ratio = baseline / chain.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from compt.families import family_of
from compt.recipes import Recipe

ANALYTIC_TOLERANCE = 0.05  # counted and closed-form FLOPs must agree this closely


@dataclass(frozen=True)
class ModelCost:
    name: str
    params: int
    train_per_sample: int  # student forward+backward, counted
    teacher_forward_per_sample: int  # the predecessor's forward (0 for the first model / no alignment)
    baseline_samples: int
    chain_samples: int
    baseline_flops: int  # baseline_samples x train_per_sample
    chain_student_flops: int
    chain_teacher_flops: int
    chain_flops: int  # student + teacher
    baseline_epochs: float | None
    chain_epochs: float | None
    analytic_train_per_sample: int | None  # None when the analytic formula does not cover the config
    analytic_teacher_forward_per_sample: int | None


@dataclass(frozen=True)
class ChainCost:
    recipe: str
    captions_per_image: int
    samples_per_epoch: int | None
    per_model: list[ModelCost]
    baseline_flops: int
    chain_flops: int
    acceleration: float  # baseline_flops / chain_flops
    analytic_acceleration: float | None
    analytic_max_rel_diff: float | None  # over every per-sample figure used

    @property
    def analytic_agrees(self) -> bool | None:
        if self.analytic_max_rel_diff is None:
            return None
        return self.analytic_max_rel_diff <= ANALYTIC_TOLERANCE

    def to_json(self) -> dict:
        out = asdict(self)
        out["analytic_agrees"] = self.analytic_agrees
        out["analytic_tolerance"] = ANALYTIC_TOLERANCE
        return out


def chain_cost(recipe: Recipe) -> ChainCost:
    """Every model's baseline and chain cost, counted on the meta device and cross-checked analytically."""
    counters = family_of(recipe.family).cost_counters(recipe)
    count, analytic, count_params = counters.count, counters.analytic, counters.params
    models, diffs = [], []
    analytic_ok = True
    for k, m in enumerate(recipe.models):
        student = count(m.config)
        teacher_cfg = recipe.models[k - 1].config if k > 0 and m.teacher else None
        teacher = count(teacher_cfg) if teacher_cfg else None
        a_student = analytic(m.config)
        a_teacher = analytic(teacher_cfg) if teacher_cfg else None
        if a_student is None or (teacher_cfg and a_teacher is None):
            analytic_ok = False
        else:
            diffs.append(_rel(student.train, a_student.train))
            if teacher:
                diffs.append(_rel(teacher.forward, a_teacher.forward))
        t_fwd = teacher.forward if teacher else 0
        a_t_fwd = 0 if not teacher_cfg else (a_teacher.forward if a_teacher else None)
        student_flops, teacher_flops = m.chain_samples * student.train, m.chain_samples * t_fwd
        models.append(ModelCost(
            name=m.name, params=count_params(m.config),
            train_per_sample=student.train, teacher_forward_per_sample=t_fwd,
            baseline_samples=m.baseline_samples, chain_samples=m.chain_samples,
            baseline_flops=m.baseline_samples * student.train,
            chain_student_flops=student_flops, chain_teacher_flops=teacher_flops,
            chain_flops=student_flops + teacher_flops,
            baseline_epochs=m.baseline_epochs, chain_epochs=m.chain_epochs,
            analytic_train_per_sample=a_student.train if a_student else None,
            analytic_teacher_forward_per_sample=a_t_fwd,
        ))
    baseline = sum(m.baseline_flops for m in models)
    chain = sum(m.chain_flops for m in models)
    analytic_ratio = None
    if analytic_ok:
        a_base = sum(m.baseline_samples * m.analytic_train_per_sample for m in models)
        a_chain = sum(m.chain_samples * (m.analytic_train_per_sample + m.analytic_teacher_forward_per_sample)
                      for m in models)
        analytic_ratio = a_base / a_chain
        diffs.append(_rel(baseline / chain, analytic_ratio))
    return ChainCost(
        recipe=recipe.name, captions_per_image=recipe.captions_per_image,
        samples_per_epoch=recipe.samples_per_epoch, per_model=models,
        baseline_flops=baseline, chain_flops=chain, acceleration=baseline / chain,
        analytic_acceleration=analytic_ratio,
        analytic_max_rel_diff=max(diffs) if analytic_ok and diffs else None,
    )


def _rel(counted: float, analytic: float) -> float:
    return abs(counted - analytic) / abs(analytic)

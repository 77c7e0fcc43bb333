from composer.plan.model import Operation, Plan, PlannedTensor, TensorRef
from composer.plan.staged import build_plan

__all__ = ["Operation", "Plan", "PlannedTensor", "TensorRef", "build_plan"]

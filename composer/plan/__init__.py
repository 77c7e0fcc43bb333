from composer.plan.build import build_plan
from composer.plan.model import Operation, Plan, PlannedTensor, TensorRef

__all__ = ["Operation", "Plan", "PlannedTensor", "TensorRef", "build_plan"]

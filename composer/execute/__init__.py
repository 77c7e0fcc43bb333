from composer.execute.executor import ExecutionOptions, ExecutionReport, execute
from composer.execute.schedule import make_schedule

__all__ = ["ExecutionOptions", "ExecutionReport", "execute", "make_schedule"]

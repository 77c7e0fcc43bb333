from composer.execute.executor import ExecutionOptions, ExecutionReport, execute

__all__ = ["ExecutionOptions", "ExecutionReport", "execute"]

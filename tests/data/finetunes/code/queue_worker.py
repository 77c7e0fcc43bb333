"""A worker thread that takes jobs from a queue until it is told to stop."""

import logging
import queue
import threading

log = logging.getLogger(__name__)
STOP = object()


class Worker(threading.Thread):
    def __init__(self, jobs, results):
        super().__init__(daemon=True)
        self.jobs = jobs
        self.results = results

    def run(self):
        while True:
            job = self.jobs.get()
            try:
                if job is STOP:
                    return
                function, arguments = job
                self.results.put(function(*arguments))
            except Exception as error:
                log.warning("job failed: %s", error)
                self.results.put(error)
            finally:
                self.jobs.task_done()


def run_all(function, argument_lists, workers=4):
    jobs, results = queue.Queue(), queue.Queue()
    threads = [Worker(jobs, results) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for arguments in argument_lists:
        jobs.put((function, arguments))
    for _ in threads:
        jobs.put(STOP)
    jobs.join()
    return [results.get() for _ in argument_lists]

"""Working days between two dates, skipping weekends and listed holidays."""

import datetime

ONE_DAY = datetime.timedelta(days=1)


def parse(text):
    return datetime.date.fromisoformat(text.strip())


def working_days(start, end, holidays=()):
    if end < start:
        start, end = end, start
    holidays = set(holidays)
    count = 0
    day = start
    while day <= end:
        if day.weekday() < 5 and day not in holidays:
            count += 1
        day += ONE_DAY
    return count


def next_working_day(day, holidays=()):
    day += ONE_DAY
    while day.weekday() >= 5 or day in holidays:
        day += ONE_DAY
    return day


def month_end(day):
    first_of_next = (day.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    return first_of_next - ONE_DAY

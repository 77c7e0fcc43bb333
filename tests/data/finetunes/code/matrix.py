"""Plain lists of lists as matrices: products, transposes and the identity."""


def zeros(rows, columns):
    return [[0.0] * columns for _ in range(rows)]


def identity(size):
    result = zeros(size, size)
    for index in range(size):
        result[index][index] = 1.0
    return result


def transpose(matrix):
    return [list(row) for row in zip(*matrix)]


def multiply(left, right):
    if len(left[0]) != len(right):
        raise ValueError("the shapes do not match")
    columns = transpose(right)
    return [[sum(a * b for a, b in zip(row, column)) for column in columns] for row in left]


def power(matrix, exponent):
    result = identity(len(matrix))
    while exponent > 0:
        if exponent % 2 == 1:
            result = multiply(result, matrix)
        matrix = multiply(matrix, matrix)
        exponent //= 2
    return result


def trace(matrix):
    return sum(matrix[index][index] for index in range(len(matrix)))

# The overview page's quickstart, verbatim: runs on the embedded local cluster with no configuration.
from burla import remote_parallel_map


def my_function(my_input):
    print(my_input)
    return my_input * 2


my_inputs = [1, 2, 3]

outputs = remote_parallel_map(my_function, my_inputs)

print(list(outputs))

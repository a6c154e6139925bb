"""pycma's CMA-ES for maximisation, with a random stream it owns and a state that is plain data.

Two things make a resumed run continue exactly the trajectory of an uninterrupted one:

- **Its own generator.** pycma samples with the `randn` option, by default `np.random.randn`, the method of
  numpy's global generator, which pycma itself also draws from elsewhere (`CMAAdaptSigmaTPA.check_consistency`
  calls `np.random.randint`). A pickled strategy comes back with a private copy of that generator, so after a
  resume those other draws no longer shift the samples and the runs part ways. Here the sampler draws from a
  `np.random.RandomState` that belongs to the strategy alone (seeded as pycma's own seeding would seed the global
  one); its state is saved and restored with the rest.
- **State as data.** `state_dict()` walks the strategy's object graph (its pycma objects and their attributes)
  and returns numbers, strings, lists, dicts and arrays: nothing that names a function or class to call.
  `from_state()` builds a fresh strategy from the constructor settings and writes those values back onto the
  same attributes, restoring which arrays were one shared object. Options, loggers, timers and methods are not
  state: the constructor rebuilds them from the settings.
"""

from __future__ import annotations

import inspect
import keyword
from typing import Any

import numpy as np


class StateError(ValueError):
    """A strategy state that does not fit the strategy its settings build (corrupt or crafted data)."""


MAX_POPULATION = 100_000  # pycma allocates per member: a larger population is refused before anything is built

# Attributes that are behaviour or bookkeeping rebuilt by the constructor from the settings, never state.
NOT_STATE = frozenset({
    "opts", "inopts", "_es_opts", "inputargs",  # options (the constructor settings rebuild them)
    "randn",  # the sampler's generator: saved separately, as the generator's state
    "logger", "timer",  # logging and wall-clock bookkeeping
    "weights",  # recombination weights: a function of the settings (a list subclass with attributes)
    "more_to_write", "_stopdict",  # logger / stop-criterion bookkeeping (list and dict subclasses)
    "_round_integer_variables",  # integer-variable handling (none here), built from the options it holds
})


def _is_strategy_object(value: Any) -> bool:
    module = type(value).__module__ or ""
    return (module == "cma" or module.startswith("cma.")) and hasattr(value, "__dict__") and not isinstance(value, (list, dict, tuple))


class CMAES:
    """pycma's CMA-ES with maximisation, its own random generator and a state that is plain data.

    Args:
        mean: initial distribution mean, shape (dim,).
        sigma0: initial step size.
        population: members per generation.
        seed: seeds the sampler's generator (`seed + 1`, as pycma seeds numpy's global generator).
        separable: the diagonal (separable) variant.
    """

    def __init__(self, mean: np.ndarray, sigma0: float, population: int, seed: int, separable: bool = False):
        import cma

        mean = np.array(mean, dtype=float)  # a copy: the strategy must not share the caller's array
        self.settings = {"dim": int(mean.shape[0]), "sigma0": float(sigma0), "population": int(population),
                         "seed": int(seed), "separable": bool(separable)}
        self.random = np.random.RandomState(seed + 1)
        options = {"popsize": int(population), "verbose": -9, "CMA_diagonal": bool(separable),
                   "randn": self.random.randn, "seed": np.nan}  # nan: pycma leaves numpy's global generator alone
        self.strategy = cma.CMAEvolutionStrategy(mean, float(sigma0), options)

    def ask(self) -> np.ndarray:
        return np.asarray(self.strategy.ask())

    def tell(self, solutions: np.ndarray, fitness: list[float]) -> None:
        self.strategy.tell(list(solutions), [-float(f) for f in fitness])  # cma minimises

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.strategy.mean)

    @property
    def sigma(self) -> float:
        return float(self.strategy.sigma)

    @property
    def dim(self) -> int:
        return self.settings["dim"]

    # ------------------------------------------------------------------ state as data
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """`(tree, arrays)`: a JSON-able description of the whole state and the arrays it refers to by name.

        The tree holds the constructor settings, the generator's state and every attribute of the strategy's
        pycma objects except `NOT_STATE`; it raises `TypeError` on a value it cannot store as data (a sign that
        pycma grew state this walker does not know, which must not be dropped silently).
        """
        arrays: dict[str, np.ndarray] = {}
        name, key, position, has_gauss, cached_gaussian = self.random.get_state()
        arrays["rng.key"] = np.asarray(key, dtype=np.uint32)
        tree = {
            "settings": dict(self.settings),
            "rng": {"algorithm": name, "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "strategy": _Encoder(arrays).object(self.strategy, "strategy"),
        }
        return tree, arrays

    @classmethod
    def from_state(cls, tree: dict[str, Any], arrays: dict[str, np.ndarray]) -> "CMAES":
        """Rebuild a strategy from `state_dict()`'s output. Raises `StateError` when the data does not fit."""
        try:
            settings = dict(tree["settings"])
            dim, population, seed = (_integer(settings[k], k) for k in ("dim", "population", "seed"))
            sigma0 = settings["sigma0"]
            if not isinstance(sigma0, float) or not np.isfinite(sigma0) or sigma0 <= 0:
                raise StateError(f"sigma0 must be a positive finite number, got {sigma0!r}")
            if (not isinstance(settings["separable"], bool) or dim < 1 or not 2 <= population <= MAX_POPULATION
                    or not 0 <= seed < 2**32 - 1):
                raise StateError(f"implausible settings {settings!r}")
            x0 = _Decoder(arrays).value(tree["strategy"]["attributes"]["x0"], "strategy.x0")
            if not isinstance(x0, np.ndarray) or x0.shape != (dim,) or x0.dtype != np.float64 or not np.isfinite(x0).all():
                raise StateError(f"x0 must be a finite float64 array of shape ({dim},)")
            # A full-covariance strategy allocates dim x dim matrices when it is built. A genuine checkpoint holds its
            # covariance, so a file much smaller than one such matrix asks for memory it cannot back: refuse it
            # before building anything (a crafted 1 MB file must not allocate gigabytes).
            stored = sum(array.nbytes for array in arrays.values())
            if not settings["separable"] and stored < dim * dim * 8:
                raise StateError(f"a full-covariance strategy of {dim} dimensions needs its {dim} x {dim} covariance, "
                                 f"but the file holds only {stored} bytes of arrays")
            es = cls(x0, sigma0, population, seed, settings["separable"])
            rng = tree["rng"]
            key = arrays["rng.key"]
            if rng["algorithm"] != "MT19937" or key.dtype != np.uint32 or key.shape != (624,):
                raise StateError("the generator state is not an MT19937 state")
            es.random.set_state(("MT19937", key, _integer(rng["position"], "position"), _integer(rng["has_gauss"], "has_gauss"),
                                 float(rng["cached_gaussian"])))
            _Decoder(arrays).restore(es.strategy, tree["strategy"], "strategy")
            if not (np.isfinite(es.mean).all() and np.isfinite(es.sigma) and es.sigma > 0):
                raise StateError("the restored mean or step size is not finite")
            if es.strategy.countiter > 0 and not hasattr(es.strategy, "timer"):
                from cma.utilities.utils import ElapsedWCTime

                es.strategy.timer = ElapsedWCTime()  # `ask` makes it at iteration 0 only, and expects it later
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise StateError(f"the CMA-ES state does not fit ({type(error).__name__}: {error})") from None
        return es


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{name} must be an integer, got {value!r}")
    return value


class _Encoder:
    """Turns a pycma object graph into JSON-able nodes; arrays go to `arrays` under their first path."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.seen: dict[int, tuple[str, Any]] = {}  # id -> (path, object): shared arrays / objects stay shared

    def object(self, obj: Any, path: str) -> dict[str, Any]:
        self.seen[id(obj)] = (path, obj)
        attributes = {}
        for name, value in vars(obj).items():
            if name in NOT_STATE:
                continue
            if callable(value) and not _is_strategy_object(value):
                continue  # methods and functions chosen by the options (eigen solver, integer centering)
            attributes[name] = self.value(value, f"{path}.{name}")
        return {"object": f"{type(obj).__module__}.{type(obj).__qualname__}", "attributes": attributes}

    def value(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)) or type(value) in (int, float):
            return value
        if isinstance(value, np.generic):
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{path}: numpy scalar of dtype {value.dtype} is not storable")
            return {"scalar": value.dtype.str, "value": value.item()}
        if id(value) in self.seen and self.seen[id(value)][1] is value:
            return {"same_as": self.seen[id(value)][0]}
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{path}: array of dtype {value.dtype} is not storable")
            root = value
            while isinstance(root.base, np.ndarray):
                root = root.base
            if root is not value:  # a view (pycma keeps the diagonal of C as one): it must stay a view of its array
                return self.view(value, root, path)
            self.seen[id(value)] = (path, value)
            # Memory order is kept too: a product with a Fortran-ordered matrix (eigh's eigenvectors) rounds differently.
            fortran = value.ndim > 1 and value.flags.f_contiguous and not value.flags.c_contiguous
            self.arrays[path] = np.array(value.T if fortran else value, order="C")  # (ascontiguousarray makes 0-d 1-d)
            return {"array": path, "order": "F" if fortran else "C"}
        if _is_strategy_object(value):
            return self.object(value, path)
        if type(value) is tuple:
            return {"tuple": [self.value(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if type(value) is range:
            return {"range": [value.start, value.stop, value.step]}
        if type(value) is list:  # lists and dicts may be shared and changed in place, like arrays
            self.seen[id(value)] = (path, value)
            return {"list": [self.value(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if type(value) is dict:
            self.seen[id(value)] = (path, value)
            return {"dict": [[self.value(k, f"{path}.key{i}"), self.value(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        raise TypeError(f"{path}: {type(value).__module__}.{type(value).__qualname__} is not storable as data")


    def view(self, value: np.ndarray, root: np.ndarray, path: str) -> dict[str, Any]:
        if value.dtype != root.dtype or not (root.flags.c_contiguous or root.flags.f_contiguous):
            raise TypeError(f"{path}: a view with another dtype, or of a non-contiguous array, is not storable")
        self.seen[id(value)] = (path, value)
        base = self.value(root, f"{path}.base")
        offset = value.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        return {"view": base, "offset": offset, "shape": list(value.shape), "strides": list(value.strides),
                "writeable": bool(value.flags.writeable)}


class _Decoder:
    """The inverse of `_Encoder`, onto a freshly built strategy: it assigns data, never imports or calls by name."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.objects: dict[str, Any] = {}  # path -> restored object or array, for `same_as`

    def restore(self, obj: Any, node: Any, path: str) -> None:
        if not isinstance(node, dict) or set(node) != {"object", "attributes"} or not isinstance(node["attributes"], dict):
            raise StateError(f"{path}: expected an object node")
        expected = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if node["object"] != expected:
            raise StateError(f"{path} is a {node['object']!r} in the checkpoint but a {expected!r} here "
                             "(another pycma version or other settings)")
        self.objects[path] = obj
        for name, child in node["attributes"].items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__") or name in NOT_STATE:
                raise StateError(f"{path}: {name!r} is not an attribute a checkpoint may set")
            if hasattr(type(inspect.getattr_static(type(obj), name, None)), "__get__"):
                raise StateError(f"{path}.{name} is a method or property here, not state")
            current = vars(obj).get(name)
            if callable(current) and not _is_strategy_object(current):
                raise StateError(f"{path}.{name} is a function here, not state")
            if isinstance(child, dict) and "object" in child:
                if not _is_strategy_object(current):
                    raise StateError(f"{path}.{name}: the checkpoint holds an object where this strategy has none")
                self.restore(current, child, f"{path}.{name}")
            else:
                setattr(obj, name, self.value(child, f"{path}.{name}"))

    def view(self, node: dict[str, Any], path: str) -> np.ndarray:
        return _view_of(self, node, path)

    def value(self, node: Any, path: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, dict) or not node:
            raise StateError(f"{path}: unreadable value")
        if "scalar" in node:
            dtype = np.dtype(str(node["scalar"]))
            if dtype.kind not in "biuf" or not isinstance(node.get("value"), (bool, int, float)):
                raise StateError(f"{path}: bad scalar")
            return dtype.type(node["value"])
        if "array" in node:
            if node["array"] not in self.arrays:
                raise StateError(f"{path}: array {node['array']!r} is missing")
            array = self.objects.get(node["array"])
            if array is None:
                order = node.get("order", "C")
                if order not in ("C", "F"):
                    raise StateError(f"{path}: bad array order")
                stored = self.arrays[node["array"]]
                # A writable copy that pycma may update in place; a Fortran-ordered one was stored transposed.
                array = np.array(stored.T, order="F") if order == "F" else np.array(stored, order="C")
                self.objects[node["array"]] = array
            return array
        if "view" in node:
            return self.view(node, path)
        if "same_as" in node:
            if node["same_as"] not in self.objects:
                raise StateError(f"{path}: refers to {node['same_as']!r}, which comes later or not at all")
            return self.objects[node["same_as"]]
        if "list" in node and isinstance(node["list"], list):
            result = self.objects[path] = []
            result.extend(self.value(item, f"{path}.{i}") for i, item in enumerate(node["list"]))
            return result
        if "tuple" in node and isinstance(node["tuple"], list):
            return tuple(self.value(item, f"{path}.{i}") for i, item in enumerate(node["tuple"]))
        if "range" in node and isinstance(node["range"], list) and len(node["range"]) == 3:
            return range(*(_integer(bound, path) for bound in node["range"]))
        if "dict" in node and isinstance(node["dict"], list):
            result = self.objects[path] = {}
            for i, pair in enumerate(node["dict"]):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise StateError(f"{path}: bad dict entry")
                key = self.value(pair[0], f"{path}.key{i}")
                if isinstance(key, (list, dict, np.ndarray)):
                    raise StateError(f"{path}: unhashable dict key")
                result[key] = self.value(pair[1], f"{path}.{i}")
            return result
        raise StateError(f"{path}: unreadable value")


def _view_of(decoder: "_Decoder", node: dict[str, Any], path: str) -> np.ndarray:
    """The view `node` describes (offset, shape and strides in bytes into its base array), bounds checked."""
    base = decoder.value(node["view"], f"{path}.base")
    shape, strides, offset = node["shape"], node["strides"], node["offset"]
    if (not isinstance(base, np.ndarray) or not isinstance(shape, list) or not isinstance(strides, list) or len(shape) != len(strides)
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in [*shape, *strides, offset])
            or any(n < 0 for n in shape) or not isinstance(node.get("writeable"), bool)):
        raise StateError(f"{path}: bad view")
    memory = base.ravel(order="K")
    if not np.shares_memory(memory, base):
        raise StateError(f"{path}: the base of a view is not contiguous")
    itemsize = base.dtype.itemsize
    low = offset + sum(min(0, (n - 1) * s) for n, s in zip(shape, strides) if n)
    high = offset + sum(max(0, (n - 1) * s) for n, s in zip(shape, strides) if n) + itemsize
    if 0 not in shape and (low < 0 or high > memory.nbytes or offset % itemsize):
        raise StateError(f"{path}: a view reaches outside its array")
    start = memory[offset // itemsize:] if 0 not in shape else memory[:0]
    view = np.lib.stride_tricks.as_strided(start, shape=tuple(shape), strides=tuple(strides),
                                           writeable=node["writeable"] and memory.flags.writeable)
    decoder.objects[path] = view
    return view


def maximize_with_cma(
    fitness,
    dim: int,
    *,
    generations: int,
    population: int = 8,
    sigma0: float = 0.5,
    seed: int = 0,
    separable: bool = False,
) -> CMAES:
    """A plain maximisation loop with the same CMA-ES core (used for quick checks on synthetic fitness)."""
    es = CMAES(np.zeros(dim), sigma0, population, seed, separable)
    for _ in range(generations):
        solutions = es.ask()
        es.tell(solutions, fitness(solutions))
    return es

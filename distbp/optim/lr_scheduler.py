"""Learning-rate schedules in closed form: the rate at step t depends on t alone, so resuming is exact."""

import math
import numbers

from .optimizer import _plain, is_finite_real


class LRScheduler:
    """Sets every group's lr to lr_at(base_lr, t); call step() once per optimizer step."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def lr_at(self, base_lr, t):
        raise NotImplementedError

    def _check_groups(self):
        groups = len(self.optimizer.param_groups)
        if groups != len(self.base_lrs):  # zip would leave a group added since at its own rate, unscheduled
            raise ValueError(f"{type(self).__name__}: the optimizer has {groups} parameter groups and the schedule "
                             f"was made for {len(self.base_lrs)}: make the schedule after adding every group")

    def _rates(self, t):
        self._check_groups()
        rates = []
        for base in self.base_lrs:
            # a Python float: a np.float64 rate (np.cos in a lambda, say) made every update a float64 temporary
            lr = _plain(self.lr_at(base, t))
            if not is_finite_real(lr) or lr < 0:  # nan would turn the parameters into nan at the next step
                raise ValueError(f"{type(self).__name__}: learning rate {lr!r} at step {t}")
            rates.append(lr)
        return rates

    def _apply(self, rates=None):
        for group, lr in zip(self.optimizer.param_groups, rates or self._rates(self.last_step)):
            group["lr"] = lr
        self._written = [g["lr"] for g in self.optimizer.param_groups]

    def step(self):
        # the rate is a function of the step alone: a rate set since by someone else would be overwritten
        for i, (group, written) in enumerate(zip(self.optimizer.param_groups, self._written)):
            if group["lr"] != written:
                raise ValueError(
                    f"{type(self).__name__}: parameter group {i}'s lr is {group['lr']!r}, but this schedule set "
                    f"{written!r}: it was changed outside the schedule (by hand, or by another schedule on the same "
                    "optimizer), and the schedule would overwrite it. Schedules here are functions of the step: "
                    "combine them in one (LinearWarmupLR's after=, LambdaLR), or make the schedule after setting lr")
        rates = self._rates(self.last_step + 1)  # before the step is counted: a refused step changes nothing
        self.last_step += 1
        self._apply(rates)

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.last_step, self.base_lrs = self.check_state_dict(state)
        self._apply()

    def check_state_dict(self, state):
        """(last_step, base_lrs) of a state_dict, or ValueError naming what is wrong; changes nothing."""
        if not isinstance(state, dict) or "last_step" not in state or "base_lrs" not in state:
            raise ValueError("schedule state is not a dict with 'last_step' and 'base_lrs'")
        last_step, base_lrs = state["last_step"], state["base_lrs"]
        if not isinstance(last_step, numbers.Integral) or isinstance(last_step, bool) or last_step < 0:
            raise ValueError(f"schedule state: last_step {last_step!r} is not an integer >= 0")
        groups = len(self.optimizer.param_groups)
        if (not isinstance(base_lrs, (list, tuple)) or len(base_lrs) != groups
                or not all(is_finite_real(lr) and lr >= 0 for lr in base_lrs)):
            raise ValueError(f"schedule state: base_lrs {base_lrs!r} is not {groups} learning rates >= 0 "
                             "(one per parameter group)")
        return int(last_step), list(base_lrs)


class StepLR(LRScheduler):
    """lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be at least 1, got {step_size}")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer)

    def lr_at(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """From lr down to eta_min along half a cosine over t_max steps, then eta_min."""

    def __init__(self, optimizer, t_max, eta_min=0.0):
        if t_max < 1:
            raise ValueError(f"CosineAnnealingLR: t_max must be at least 1, got {t_max}")
        self.t_max, self.eta_min = t_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, base_lr, t):
        t = min(t, self.t_max)
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.t_max)) / 2


class LinearWarmupLR(LRScheduler):
    """Linear warm-up from lr/warmup_steps to lr over warmup_steps steps, then `after` (or constant lr).

    `after` is another schedule (or its lr_at), applied to the steps after the warm-up, e.g.
    LinearWarmupLR(opt, 100, after=CosineAnnealingLR(opt, 900)).
    """

    def __init__(self, optimizer, warmup_steps, after=None):
        if warmup_steps < 1:
            raise ValueError(f"LinearWarmupLR: warmup_steps must be at least 1, got {warmup_steps}")
        if isinstance(after, LRScheduler):  # the schedule itself given for its lr_at
            after = after.lr_at
        if after is not None and not callable(after):
            raise TypeError(f"LinearWarmupLR: after must be a schedule or its lr_at(base_lr, t), not "
                            f"{type(after).__name__}")
        self.warmup_steps, self.after = warmup_steps, after
        super().__init__(optimizer)

    def lr_at(self, base_lr, t):
        if t < self.warmup_steps:
            return base_lr * (t + 1) / self.warmup_steps
        return self.after(base_lr, t - self.warmup_steps) if self.after else base_lr


class LambdaLR(LRScheduler):
    """lr * fn(t)."""

    def __init__(self, optimizer, fn):
        self.fn = fn
        super().__init__(optimizer)

    def lr_at(self, base_lr, t):
        return base_lr * self.fn(t)

"""The training methods and the facts about each (what it inherits, what it needs of the
teacher, which loss settings it reads). A leaf: it imports nothing from the project."""

from __future__ import annotations

import enum


class Method(enum.StrEnum):
    """How the student is trained (README "Millions of identities", orchestrator/losses)."""

    PROXYLESS = "proxyless"  # inherited frozen teacher classifier (ProxylessKD)
    SCRATCH = "scratch"  # the student's own trainable margin classifier
    L2 = "l2"  # own classifier + squared L2 to the teacher's embeddings
    LOGIT = "logit"  # own classifier + Hinton KD on the teacher's logits
    PROXYLESS_L2 = "proxyless+l2"  # inherited classifier + squared L2 to the teacher
    CCKD = "cckd"  # own classifier + L2 + correlation congruence (Peng et al. 2019)
    MULTISTEP = "multistep"  # own classifier + L2 to a teacher checkpoint per stage (PocketNet)

    # The facts about each method, in one place: config validation, the driver, the loss
    # factory and the tests all ask these properties.

    @property
    def inherits_classifier(self) -> bool:
        """The student's logits are taken against the teacher's frozen classifier W."""
        return self in (Method.PROXYLESS, Method.PROXYLESS_L2)

    @property
    def uses_teacher_classifier(self) -> bool:
        """W must be placed for the workers: inherited, or (logit) applied to the teacher's
        own embeddings to make the soft targets."""
        return self.inherits_classifier or self is Method.LOGIT

    @property
    def needs_teacher_embeddings(self) -> bool:
        """Each batch also goes through the teacher backbone."""
        return self in (
            Method.L2,
            Method.LOGIT,
            Method.PROXYLESS_L2,
            Method.CCKD,
            Method.MULTISTEP,
        )

    @property
    def needs_teacher_width(self) -> bool:
        """The student must embed in the teacher's space: student.emb_dim == teacher.emb_dim.

        ``logit`` does not: Hinton KD compares class probabilities, the teacher's from W on
        the teacher's embeddings and the student's from its own head, so the student's
        width is free."""
        return self.inherits_classifier or self in (Method.L2, Method.CCKD, Method.MULTISTEP)

    @property
    def uses_l2(self) -> bool:
        return self in (Method.L2, Method.PROXYLESS_L2)

    @property
    def shardable(self) -> bool:
        """The class-sharded loss (sharding.mode sharded) implements this method."""
        return self is Method.PROXYLESS

    @property
    def loss_settings(self) -> tuple[str, ...]:
        """The method-specific keys of the ``loss`` section this method reads (the margin
        aside, which every method reads); the others have no effect on its runs."""
        return {
            Method.L2: ("l2_weight",),
            Method.PROXYLESS_L2: ("l2_weight",),
            Method.LOGIT: ("kd_temperature", "kd_weight"),
            Method.CCKD: ("cckd",),
            Method.MULTISTEP: ("multistep",),
        }.get(self, ())


METHOD_LOSS_SETTINGS = ("l2_weight", "kd_temperature", "kd_weight", "cckd", "multistep")

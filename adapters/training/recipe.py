"""The LoRA training recipe: one typed object, from the API to the trainer.

    API body                 JobCreate.lora (LoraRecipe) + .hyperparameters ("auto" allowed)
      -> TrainingRecipe      every value concrete, bounds checked (`check`: 400 at creation)
      -> job row             FineTuneJob.lora / .hyperparameters hold the parts' model_dump;
                             `TrainingRecipe.of_job` reads them back with model_validate
      -> TrainConfig         built by the worker with `train_config`

Learning rate: `(lora.learning_rate or BASE_LEARNING_RATE) * learning_rate_multiplier`. The
multiplier scales whichever base is chosen, as OpenAI's multiplier scales its own base rate:
`lora.learning_rate` replaces the base, it does not switch the multiplier off. The result must
stay below 1.

"auto" hyperparameters resolve to DEFAULT_EPOCHS, DEFAULT_BATCH_SIZE and a multiplier of 1.

This module imports pydantic only (no torch), so the gateway can use it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from adapters.errors import InvalidInput

if TYPE_CHECKING:
    from adapters.registry.models import FineTuneJob
    from adapters.training.trainer import TrainConfig

BASE_LEARNING_RATE = 2e-4
"""The learning rate of a multiplier of 1 when `lora.learning_rate` is not set."""
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4
DEFAULT_LEARNING_RATE_MULTIPLIER = 1.0
DEFAULT_SEED = 42
MAX_EPOCHS = 50  # OpenAI's bounds
MAX_BATCH_SIZE = 256


class LoraRecipe(BaseModel):
    """loraplex's extension of the job body (`lora`): the LoRA part of the recipe. Every
    field is optional; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=16, ge=1, le=256)
    """LoRA rank; at most the server's max_lora_rank."""
    alpha: float = Field(default=32, gt=0)
    """LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] = Field(default=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)
    """Module name suffixes of the base model that get LoRA weights."""
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    """Base learning rate, instead of BASE_LEARNING_RATE; still scaled by the multiplier."""
    use_dora: bool = False
    """Refused: vLLM cannot serve DoRA (kept so the refusal says why)."""
    use_rslora: bool = False
    """Rank-stabilised scaling, alpha / sqrt(r)."""
    loraplus_lr_ratio: float | None = Field(default=None, gt=0, le=64)
    """LoRA+: the B matrices learn at learning_rate * ratio."""
    load_in_4bit: bool = False
    """QLoRA: the base model is loaded NF4-quantized (bitsandbytes)."""
    modules_to_save: list[str] | None = None
    """Refused: vLLM cannot serve fully trained extra modules (kept so the refusal says why)."""
    max_seq_len: int = Field(default=512, ge=16, le=8192)
    """Longest example in tokens (chat template included); longer ones are refused."""
    general_data_ratio: float = Field(default=0.0, ge=0, le=4)
    """Share of general instruction examples mixed in, against catastrophic forgetting."""
    require_improvement: bool = False
    """Register the adapter only if its held-out loss beats the base model's."""

    def check_servable(self, max_lora_rank: int, module_suffixes: Collection[str]) -> None:
        """Refuse what this server could not serve once trained (InvalidInput, a 400)."""
        if self.use_dora:
            raise InvalidInput("use_dora: vLLM cannot serve DoRA magnitude vectors (vLLM #6983), "
                               "so such an adapter could not be used here",
                               param="lora.use_dora", code="unservable_adapter")
        if self.modules_to_save:
            raise InvalidInput("modules_to_save: vLLM cannot serve fully trained extra modules "
                               "(vLLM #9280)", param="lora.modules_to_save",
                               code="unservable_adapter")
        if self.r > max_lora_rank:
            raise InvalidInput(f"lora.r {self.r} is over the engine's limit of {max_lora_rank} "
                               "(an operator can raise LORAPLEX_MAX_LORA_RANK)", param="lora.r")
        unknown = [t for t in self.target_modules if t not in module_suffixes]
        if unknown:
            raise InvalidInput(f"target modules {unknown} do not exist in the base model",
                               param="lora.target_modules")


class ResolvedHyperparameters(BaseModel):
    """OpenAI's hyperparameters with "auto" resolved: what a job row and a job object show."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int = Field(default=DEFAULT_EPOCHS, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=MAX_BATCH_SIZE)
    learning_rate_multiplier: float = Field(default=DEFAULT_LEARNING_RATE_MULTIPLIER, gt=0)


_ALLOWED = {
    "n_epochs": f'must be "auto" or an integer from 1 to {MAX_EPOCHS}',
    "batch_size": f'must be "auto" or an integer from 1 to {MAX_BATCH_SIZE}',
    "learning_rate_multiplier": 'must be "auto" or a number above 0',
}


class Hyperparameters(BaseModel):
    """OpenAI's `hyperparameters` as a request carries them; "auto" means the default."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"

    @field_validator("n_epochs", "batch_size", "learning_rate_multiplier", mode="wrap")
    @classmethod
    def _one_error(cls, value: object, handler: ValidatorFunctionWrapHandler,
                   info: ValidationInfo) -> object:
        """One plain error naming the field, instead of one per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("auto_or_number", _ALLOWED[info.field_name or ""]) from None

    def resolve(self) -> ResolvedHyperparameters:
        return ResolvedHyperparameters(
            n_epochs=DEFAULT_EPOCHS if self.n_epochs == "auto" else self.n_epochs,
            batch_size=DEFAULT_BATCH_SIZE if self.batch_size == "auto" else self.batch_size,
            learning_rate_multiplier=(DEFAULT_LEARNING_RATE_MULTIPLIER
                                      if self.learning_rate_multiplier == "auto"
                                      else self.learning_rate_multiplier))


class TrainingRecipe(BaseModel):
    """Everything that decides what a job trains, every value concrete."""

    model_config = ConfigDict(extra="forbid")

    lora: LoraRecipe = Field(default_factory=LoraRecipe)
    hyperparameters: ResolvedHyperparameters = Field(default_factory=ResolvedHyperparameters)
    seed: int = Field(default=DEFAULT_SEED, ge=0, le=2**31 - 1)

    @property
    def learning_rate(self) -> float:
        """`(lora.learning_rate or BASE_LEARNING_RATE) * learning_rate_multiplier`."""
        base = self.lora.learning_rate or BASE_LEARNING_RATE
        return base * self.hyperparameters.learning_rate_multiplier

    def check(self, max_lora_rank: int, module_suffixes: Collection[str]) -> None:
        """Bounds that involve the server or several fields (InvalidInput, a 400)."""
        self.lora.check_servable(max_lora_rank, module_suffixes)
        if not self.learning_rate < 1:
            raise InvalidInput(
                f"the learning rate (lora.learning_rate or {BASE_LEARNING_RATE}) times "
                f"learning_rate_multiplier is {self.learning_rate:g}; it must be below 1",
                param="hyperparameters.learning_rate_multiplier")

    @classmethod
    def of_job(cls, job: FineTuneJob) -> TrainingRecipe:
        """The recipe a job row holds (its `lora` and `hyperparameters` columns and seed)."""
        return cls(lora=LoraRecipe.model_validate(job.lora),
                   hyperparameters=ResolvedHyperparameters.model_validate(job.hyperparameters),
                   seed=job.seed)

    def train_config(self, *, base_model_name: str, checkpoint_every_steps: int) -> TrainConfig:
        """The trainer's configuration (imports the trainer, hence torch)."""
        from adapters.training.trainer import TrainConfig

        lora, hp = self.lora, self.hyperparameters
        return TrainConfig(
            r=lora.r,
            alpha=lora.alpha,  # type: ignore[arg-type]  # TrainConfig says int; PEFT takes floats
            dropout=lora.dropout, target_modules=tuple(lora.target_modules),
            use_rslora=lora.use_rslora, loraplus_lr_ratio=lora.loraplus_lr_ratio,
            learning_rate=self.learning_rate, epochs=hp.n_epochs, batch_size=hp.batch_size,
            max_seq_len=lora.max_seq_len, seed=self.seed, load_in_4bit=lora.load_in_4bit,
            checkpoint_every_steps=checkpoint_every_steps, base_model_name=base_model_name)

"""One settings class for the command line, the API and the workers (prefix ``T2V_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2V_", env_file=".env", extra="ignore")

    #: Built zoos, caches and uploads. Every worker must be able to read it.
    data_dir: Path = Path("data")


def get_settings() -> Settings:
    return Settings()

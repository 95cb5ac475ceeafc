"""Only the part pyproject.toml cannot say: install ``kombu_pg-autoload.pth`` at the top
of site-packages (setuptools has no option for a file outside a package)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "kombu_pg-autoload.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("kombu_pg") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithPth})

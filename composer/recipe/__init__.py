from composer.recipe.load import load_recipe, parse_recipe
from composer.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe"]

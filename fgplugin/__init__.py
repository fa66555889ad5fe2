"""fgplugin: fine-grained, attribute-specific image similarity for fashion catalogs."""

from .errors import FgpluginError
from .schema import Attribute, AttributeSchema

__version__ = "0.1.0"
__all__ = ["Attribute", "AttributeSchema", "FgpluginError", "__version__"]

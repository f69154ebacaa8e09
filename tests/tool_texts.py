"""Meta's documented texts of tool prompts, shared by tests/test_tools.py and the script that made its
fixture of Meta's ids (tests/fixtures/make_tool_prompt_ids.py, which runs without llama_mp)."""

DATE = "21 September 2024"
REQUIRED_PROMPT = "You MUST use one of the provided functions/tools to answer the user query."  # llama-stack's

# Llama 3.3's prompt_format.md, "JSON based tool calling": the user message that lists custom functions
SONGS_JSON = """Answer the user's question by making use of the following functions if needed.
If none of the function can be used, please say so.
Here is a list of functions in JSON format:
{
    "type": "function",
    "function": {
        "name": "trending_songs",
        "description": "Returns the trending songs on a Music site",
        "parameters": {
            "type": "object",
            "properties": [
                {
                    "n": {
                        "type": "object",
                        "description": "The number of songs to return"
                    }
                },
                {
                    "genre": {
                        "type": "object",
                        "description": "The genre of the songs to return"
                    }
                }
            ],
            "required": ["n"]
        }
    }
}

Return function calls in JSON format."""

# Llama 3.2's text_prompt_format.md, "Zero shot function calling": the system prompt of the pythonic format
# (Meta's template writes the required list as Jinja's tojson does, on one line)
WEATHER_PYTHONIC = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the function can be used, point it out. If the given question lacks the parameters required by the function,
also point it out. You should only return the function call in tools call sections.

If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response.

Here is a list of functions in JSON format that you can invoke.

[
    {
        "name": "get_weather",
        "description": "Get weather info for places",
        "parameters": {
            "type": "dict",
            "required": ["city"],
            "properties": {
                "city": {
                    "type": "string",
                    "description": "The name of the city to get the weather for"
                },
                "metric": {
                    "type": "string",
                    "description": "The metric for weather. Options are: celsius, fahrenheit",
                    "default": "celsius"
                }
            }
        }
    }
]"""
